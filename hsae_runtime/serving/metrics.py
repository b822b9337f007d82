"""Prometheus metrics of the server (``serve --metrics-port``), on a registry of its own.

:class:`ServerMetrics` owns a ``CollectorRegistry`` (never the process-global one), so two
servers in one process - or two tests - never share counters. Names follow Prometheus'
conventions (``_total`` counters, ``_seconds`` durations); per-second rates come from
``rate()`` over the counters, and the last batch's throughput is also kept as gauges.

=====================================  =========  ==============================================
metric                                 type       labels / meaning
=====================================  =========  ==============================================
``hsae_requests_total``                counter    ``route`` (RPC or HTTP route), ``status``
``hsae_request_seconds``               histogram  ``route``: wall time of a request
``hsae_batch_rows``                    histogram  rows (tokens or activation rows) per batch
``hsae_batch_requests``                histogram  requests per batch
``hsae_queue_depth``                   histogram  requests waiting when a batch starts
``hsae_rows_total``                    counter    rows encoded
``hsae_lm_tokens_total``               counter    tokens run through the LM
``hsae_batch_rows_per_second``         gauge      rows / wall time of the last batch
``hsae_batch_lm_seconds``              histogram  LM time of a batch
``hsae_batch_sae_seconds``             histogram  SAE time of a batch
``hsae_generated_tokens_total``        counter    tokens generated (Generate)
``hsae_generation_step_seconds``       histogram  wall time of one generation step (all rows)
``hsae_generation_tokens_per_second``  gauge      generated tokens / wall time of the last step
``hsae_generation_streams``            gauge      generation requests in progress
=====================================  =========  ==============================================

``prometheus_client`` is the ``serving`` extra; this module imports it at the top, so the
server imports this module only when metrics are asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`ServerMetrics.exposition`."""


@dataclass
class RequestStatus:
    """What :meth:`ServerMetrics.track` records; the caller sets ``status`` if not ``OK``."""

    status: str = "OK"


class ServerMetrics:
    """The server's counters, histograms and gauges, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hsae_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "hsae_request_seconds",
            "Wall time of a request.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "hsae_batch_rows", "Rows per batch.", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "hsae_batch_requests", "Requests per batch.", buckets=_COUNT_BUCKETS, registry=r
        )
        self.queue_depth = Histogram(
            "hsae_queue_depth",
            "Requests waiting when a batch starts.",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.rows = Counter("hsae_rows", "Rows encoded.", registry=r)
        self.lm_tokens = Counter("hsae_lm_tokens", "Tokens run through the LM.", registry=r)
        self.rows_per_second = Gauge(
            "hsae_batch_rows_per_second", "Rows / wall time of the last batch.", registry=r
        )
        self.lm_seconds = Histogram(
            "hsae_batch_lm_seconds", "LM time of a batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.sae_seconds = Histogram(
            "hsae_batch_sae_seconds", "SAE time of a batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.generated_tokens = Counter("hsae_generated_tokens", "Tokens generated.", registry=r)
        self.step_seconds = Histogram(
            "hsae_generation_step_seconds",
            "Wall time of one generation step.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_tokens_per_second = Gauge(
            "hsae_generation_tokens_per_second",
            "Generated tokens / wall time of the last step.",
            registry=r,
        )
        self.generation_streams = Gauge(
            "hsae_generation_streams", "Generation requests in progress.", registry=r
        )

    # ------------------------------------------------------------------ recording
    def observe_request(self, route: str, status: str, seconds: float) -> None:
        """One answered request: ``route`` (``Encode``, ``POST /v1/encode``...), its status."""
        self.requests.labels(route=route, status=status).inc()
        self.latency.labels(route=route).observe(seconds)

    @contextmanager
    def track(self, route: str) -> Iterator[RequestStatus]:
        """Time the block as one request of ``route``; an exception escaping it counts as
        ``ERROR`` unless the block set another status first."""
        state = RequestStatus()
        start = time.perf_counter()
        try:
            yield state
        except BaseException:
            if state.status == "OK":
                state.status = "ERROR"
            raise
        finally:
            self.observe_request(route, state.status, time.perf_counter() - start)

    def observe_batch(
        self,
        *,
        rows: int,
        requests: int,
        queue_depth: int,
        seconds: float,
        lm_seconds: float,
        sae_seconds: float,
        lm_tokens: int,
    ) -> None:
        """One encode batch: its size, the queue behind it and where its time went."""
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.queue_depth.observe(queue_depth)
        self.rows.inc(rows)
        self.lm_tokens.inc(lm_tokens)
        if seconds > 0:
            self.rows_per_second.set(rows / seconds)
        self.lm_seconds.observe(lm_seconds)
        self.sae_seconds.observe(sae_seconds)

    def observe_generation_step(
        self, *, tokens: int, seconds: float, lm_seconds: float, sae_seconds: float
    ) -> None:
        """One generation step: ``tokens`` new tokens (one per live request)."""
        self.generated_tokens.inc(tokens)
        self.lm_tokens.inc(tokens)
        self.step_seconds.observe(seconds)
        self.lm_seconds.observe(lm_seconds)
        self.sae_seconds.observe(sae_seconds)
        if seconds > 0:
            self.generation_tokens_per_second.set(tokens / seconds)

    # ------------------------------------------------------------------ exposing
    def exposition(self) -> bytes:
        """The registry in Prometheus text format (``Content-Type``: :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[Any, Any]:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread.

        Returns ``(server, thread)``; ``server.server_port`` is the bound port and
        ``server.shutdown()`` stops it.
        """
        return start_http_server(port, addr=host, registry=self.registry)
