"""The gRPC server: wiring, security options, health, reflection and graceful shutdown.

* Binds ``127.0.0.1`` unless told otherwise, with ``SO_REUSEPORT`` off so a second server on
  the same port fails loudly instead of silently sharing it.
* Message sizes are explicit on both directions (gRPC's default receive limit, 4 MiB, is
  smaller than one 456x2304 float32 request).
* ``grpc.health.v1`` (always reachable without a token, for probes) and server reflection (so
  ``grpcurl`` works) are always on.
* TLS from a PEM cert/key pair and a bearer token (:mod:`~hsae_runtime.serving.security`).
* Threads: open EncodeStreams are capped (``--max-streams``, at most half the handler threads)
  and closed when idle (``--stream-idle-timeout-s``); health checks and Info run on a small
  pool of their own, so they answer however busy the main pool is.
* :meth:`RunningServer.stop`: health goes NOT_SERVING and new work calls get UNAVAILABLE while
  the port stays open; in-flight calls and received stream items get ``grace`` seconds, what is
  left then answers UNAVAILABLE; then the port closes and the batcher stops.
  :func:`serve_forever` calls it on SIGTERM / SIGINT.
* Optional, in the same process and on the same batcher: the HTTP/JSON API
  (``http_port``, :mod:`~hsae_runtime.serving.http`), Prometheus metrics (``metrics_port``,
  :mod:`~hsae_runtime.serving.metrics`) and, with an LM, generation (Generate).

:func:`start` takes a ready backend (tests, benchmarks); :func:`load_and_start` loads the model
file and the LM the way ``hsae-runtime serve`` does.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from hsae_runtime.errors import ConfigError
from hsae_runtime.refine import Readout
from hsae_runtime.serving.backend import Backend, BackendName, load_backend
from hsae_runtime.serving.batcher import Batcher
from hsae_runtime.serving.limits import DEFAULT_GRACE_S
from hsae_runtime.serving.options import ServerOptions
from hsae_runtime.serving.paging import page_in_embeddings
from hsae_runtime.serving.process import tune_process
from hsae_runtime.serving.security import HEALTH_PREFIX, TokenInterceptor, tls_credentials
from hsae_runtime.serving.servicer import HSAEServicer
from hsae_runtime.serving.stubs import load as load_stubs

pb, pb_grpc = load_stubs()
log = logging.getLogger(__name__)

SERVICE_NAME = "hsae.v1.HSAE"
_RESERVED_METHODS = frozenset({HEALTH_PREFIX + "Check", f"/{SERVICE_NAME}/Info"})
_ABORT_WAIT_S = 2.0
"""After the grace: how long calls get to send their UNAVAILABLE before the port closes."""


class _ReservedPoolInterceptor(grpc.ServerInterceptor):
    """Runs the unary methods named in ``methods`` on their own small thread pool.

    gRPC's sync server runs a handler on ``experimental_thread_pool`` when its behaviour
    carries one (``grpc_health`` uses the same hook); interceptors run on the server's polling
    thread, before any handler thread is taken, so this costs no thread of the main pool.
    """

    def __init__(self, pool: ThreadPoolExecutor, methods: frozenset[str]) -> None:
        self._pool = pool
        self._methods = methods

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method not in self._methods:
            return handler
        behaviour = handler.unary_unary
        if behaviour is None:
            return handler

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            return behaviour(request, context)

        setattr(run, "experimental_thread_pool", self._pool)  # read by grpc._server
        return handler._replace(unary_unary=run)


class RunningServer:
    """A started server. ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        servicer: HSAEServicer,
        health: Any,
        options: ServerOptions,
        reserved_pool: ThreadPoolExecutor | None = None,
        *,
        http: Any | None = None,
        metrics: Any | None = None,
        metrics_server: Any | None = None,
    ) -> None:
        self.server = server
        self.http = http
        """The HTTP/JSON server (``http.port``), if ``options.http_port`` was given."""
        self.metrics = metrics
        """The :class:`~hsae_runtime.serving.metrics.ServerMetrics`, if HTTP or metrics run."""
        self.metrics_server = metrics_server
        self.port = port
        self.servicer = servicer
        self.batcher = servicer.batcher
        self.health = health
        self.options = options
        self._reserved_pool = reserved_pool
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Drain for up to ``grace`` seconds, then close the port and stop the batcher.

        While draining, the port stays open: health answers NOT_SERVING, new Encode / Decode /
        EncodeStream calls get UNAVAILABLE, calls in progress and the items open streams have
        already received are answered, and each stream then ends with UNAVAILABLE. Calls still
        waiting when the grace runs out answer UNAVAILABLE with a message (a computation
        already running is not interrupted; it gets ``_ABORT_WAIT_S`` more to finish).
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = max(grace or 0.0, 0.0)
        gate = self.servicer.gate
        self.health.enter_graceful_shutdown()
        gate.drain()
        in_flight = gate.calls
        if in_flight:
            log.info("draining %d call(s) in progress (grace %.1f s)", in_flight, grace)
        if not gate.wait_idle(grace):
            log.warning(
                "shutdown grace over: %d call(s) still in progress answer UNAVAILABLE",
                gate.calls,
            )
            gate.abort()
            gate.wait_idle(_ABORT_WAIT_S)
        self.server.stop(_ABORT_WAIT_S).wait()
        if self.http is not None:
            self.http.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.batcher.close(timeout=_ABORT_WAIT_S)
        if self._reserved_pool is not None:
            self._reserved_pool.shutdown(wait=False)
        log.info("server on %s stopped", self.address)

    def wait(self) -> None:
        self.server.wait_for_termination()


def start(
    backend: Backend,
    *,
    lm: Any | None = None,
    hookpoint: str = "",
    capture: Callable[..., Any] | None = None,
    options: ServerOptions | None = None,
    version: str | None = None,
) -> RunningServer:
    """Start serving ``backend`` (and ``lm`` via ``capture(ids, mask, cache=None)``, see
    :class:`~hsae_runtime.serving.batch_compute.Capture`) in background threads."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from hsae_runtime import __version__

    options = options or ServerOptions()
    creds = tls_credentials(options.tls_cert, options.tls_key)  # a bad PEM fails before any work
    tune_process()  # before the thread pools: see serving/process.py
    pad_id = 0
    if lm is not None:
        pad = getattr(lm.tokenizer, "pad_token_id", None)
        pad_id = pad if isinstance(pad, int) else 0
        page_in_embeddings(lm.model)
    metrics = None
    if options.http_port is not None or options.metrics_port is not None:
        from hsae_runtime.serving.metrics import ServerMetrics

        metrics = ServerMetrics()
    generation = None
    if lm is not None:
        from hsae_runtime.serving.generate import GenerationScheduler

        generation = GenerationScheduler(
            lm, backend, hookpoint, max_generations=options.limits.max_generations,
            metrics=metrics,
        )
    batcher = Batcher(
        backend, capture, options.batching, pad_id=pad_id, generation=generation, metrics=metrics
    )
    servicer = HSAEServicer(
        batcher,
        lm=lm,
        hookpoint=hookpoint,
        limits=options.limits,
        version=version or __version__,
        metrics=metrics,
    )
    size = options.limits.max_message_bytes
    reserved_pool = ThreadPoolExecutor(
        max_workers=options.reserved_workers, thread_name_prefix="hsae-grpc-reserved"
    )
    # First in the chain, so it also moves the auth interceptor's refusals of Info.
    interceptors: list[grpc.ServerInterceptor] = [
        _ReservedPoolInterceptor(reserved_pool, _RESERVED_METHODS)
    ]
    if options.token:
        interceptors.append(TokenInterceptor(options.token))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="hsae-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_HSAEServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)

    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"{host}:{options.port}"
    try:
        if creds is not None:
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except (OSError, RuntimeError) as err:
        batcher.close()
        reserved_pool.shutdown(wait=False)
        raise ConfigError(
            f"cannot bind {address}: {err}", hint="is the port already in use?"
        ) from err
    try:
        http, metrics_server = _start_side_ports(servicer, options, metrics)
    except Exception:
        batcher.close()
        reserved_pool.shutdown(wait=False)
        raise
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(
        server, port, servicer, health_servicer, options, reserved_pool,
        http=http, metrics=metrics, metrics_server=metrics_server,
    )
    cfg = backend.config
    log.info(
        "hsae-runtime %s serving on %s%s%s | SAE d_in=%d d_sae=%d k_max=%d budgets=%s (%s, %s) | "
        "LM %s @ %s | max batch %d tokens, max wait %.1f ms, queue %d",
        servicer.version,
        running.address,
        " (TLS)" if options.tls_cert else "",
        " (token)" if options.token else "",
        cfg.d_in,
        cfg.d_sae,
        cfg.k_max,
        _budget_text(cfg.trained_budgets, cfg.k_max),
        backend.name,
        backend.device,
        lm.name if lm is not None else "none (--no-lm: activations only)",
        hookpoint or "-",
        options.batching.max_batch_tokens,
        options.batching.max_wait_ms,
        options.batching.max_queue,
    )
    return running


def _start_side_ports(
    servicer: HSAEServicer, options: ServerOptions, metrics: Any | None
) -> tuple[Any | None, Any | None]:
    """Start the HTTP/JSON API and the ``/metrics`` endpoint where ``options`` ask for them."""
    http = metrics_server = None
    if options.http_port is not None:
        from hsae_runtime.serving.http import create_app
        from hsae_runtime.serving.http_server import HTTPServer

        app = create_app(
            servicer,
            token=options.token,
            metrics=metrics,
            max_body_bytes=options.limits.max_message_bytes,
            features_dir=options.features_dir,
        )
        http = HTTPServer.start(app, options.host, options.http_port)
        log.info("HTTP/JSON API on http://%s:%d", options.host, http.port)
    if options.metrics_port is not None:
        assert metrics is not None
        metrics_server, _ = metrics.serve(options.metrics_port, options.host)
        log.info("metrics on http://%s:%d/metrics", options.host, metrics_server.server_port)
    return http, metrics_server


def load_and_start(
    model: str | Path,
    *,
    lm_name: str | None = None,
    hookpoint: str | None = None,
    no_lm: bool = False,
    device: str = "auto",
    lm_dtype: str = "float32",
    backend: BackendName = "torch",
    options: ServerOptions | None = None,
    readout: Readout = "encoder",
) -> RunningServer:
    """Load the SAE file (and its LM unless ``no_lm``) and start serving them; ``readout``
    sets how code values are computed (:mod:`hsae_runtime.refine`, torch backend only)."""
    from hsae_runtime.format import read_config
    from hsae_runtime.lm import resolve_device

    config = read_config(model)
    dev = resolve_device(device)
    sae_backend = load_backend(model, backend=backend, device=dev, readout=readout)
    if no_lm:
        return start(sae_backend, options=options)

    from hsae_runtime.lm import capture, load_lm, resolve_hookpoint

    name = lm_name or config.model_name
    if not name:
        raise ConfigError(
            f"{model} does not name its language model",
            hint="pass --lm NAME_OR_PATH, or --no-lm to serve raw activations only",
        )
    hp_name = hookpoint or config.hookpoint
    if not hp_name:
        raise ConfigError(
            f"{model} does not name its hookpoint", hint="pass --hookpoint, e.g. model.layers.6"
        )
    lm = load_lm(name, dtype=lm_dtype, device=dev)
    hp = resolve_hookpoint(lm.model, hp_name)
    if lm.d_model != config.d_in:
        raise ConfigError(
            f"the LM's width d_model={lm.d_model} does not match the SAE's d_in={config.d_in}",
            hint="serve the SAE with the LM it was trained on",
        )

    def run_lm(ids: Any, mask: Any, cache: Any = None) -> Any:
        return capture(lm, hp, ids, mask, cache=cache)

    return start(sae_backend, lm=lm, hookpoint=hp_name, capture=run_lm, options=options)


def serve_forever(running: RunningServer, grace: float = DEFAULT_GRACE_S) -> None:
    """Block until SIGTERM / SIGINT, then stop gracefully (must run in the main thread)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info(
            "%s: draining in-flight requests (grace %.0f s)", signal.Signals(signum).name, grace
        )
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    running.stop(grace)


def _budget_text(budgets: tuple[int, ...], k_max: int) -> str:
    if budgets == tuple(range(1, k_max + 1)):
        return f"1..{k_max}"
    return ",".join(map(str, budgets))
