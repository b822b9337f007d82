"""Abuse round of the serving benchmark: what a careless or hostile load does to the server.

72 idle EncodeStreams (more than ``--max-streams`` allows), one maximum-size token request, 16
single-row activation clients and a 10 MiB text, all at once, while another process probes the
health service every 50 ms. ``bench_abuse`` reports the streams refused, the small clients' and
the health probes' latencies, the 10 MiB text's refusal time and RSS, and unexpected statuses.
Run through ``serving_load.py``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serving_common import ServerProcess, lm_vocab_size, pct

from hsae_runtime.serving import build_proto

build_proto.ensure()

from hsae_runtime.client import Client, ServerError  # noqa: E402


class _IdleFeed:
    """A request iterator that sends nothing until closed."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()

    def __iter__(self):
        self._closed.wait()
        return
        yield


def ten_mb_text(c: Client) -> tuple[float, grpc.StatusCode | None]:
    """Send a 10 MiB text; (seconds to the answer, its status: None = accepted)."""
    text = "the quick brown fox " * (10 * 2**20 // 20)
    t = time.perf_counter()
    try:
        c.encode(text=text, budgets=[8], timeout=120)
    except ServerError as err:
        return time.perf_counter() - t, err.code
    return time.perf_counter() - t, None


def bench_abuse(model: Path, idle_streams: int = 72, small_clients: int = 16) -> dict[str, Any]:
    """Idle streams, a max-size request, small clients, health probes and a 10 MiB text at once.

    Expected statuses are not errors: streams past the cap get RESOURCE_EXHAUSTED (or, once
    idle past the timeout, DEADLINE_EXCEEDED) and the 10 MiB text INVALID_ARGUMENT.
    """

    from hsae_runtime.serving.stubs import load as load_stubs

    pb, pb_grpc = load_stubs()
    vocab = lm_vocab_size(model)
    rng = random.Random(0)
    server = ServerProcess(model, lm=True)
    out: dict[str, Any] = {}
    unexpected: list[str] = []
    try:
        address = server.address
        with Client(address, timeout=300) as c:
            d_in, max_tokens = c.info().d_in, c.info().max_request_tokens
            # Warm-up: one LM request of each size class, then the 10 MiB text alone.
            c.encode(tokens=[rng.randrange(vocab) for _ in range(16)], budgets=[8])
            t = time.perf_counter()
            c.encode(tokens=[rng.randrange(vocab) for _ in range(512)], budgets=[8])
            out["chunk_ms"] = (time.perf_counter() - t) * 1e3  # one 512-token forward, alone
            before = server.memory()
            out["text10_s"], code = ten_mb_text(c)
            out["text10_rss"] = (before["VmRSS"], server.memory()["VmRSS"])
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                unexpected.append(f"10 MiB text: {code}")
        out["rss_before"] = server.memory()["VmRSS"]

        # Health is probed from a process of its own, so the latencies are the server's, not
        # this process's threads competing for its GIL.
        prober = subprocess.Popen(
            [sys.executable, "-c", _PROBE, address], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        events: list[tuple[str, float]] = [("probe start", time.time())]
        stream_channel = grpc.insecure_channel(address)
        feeds = [_IdleFeed() for _ in range(idle_streams)]
        events.append(("streams opened", time.time()))
        calls = [pb_grpc.HSAEStub(stream_channel).EncodeStream(iter(f)) for f in feeds]
        time.sleep(1.0)
        refused = [c for c in calls if c.done()]
        out["streams"] = (len(calls) - len(refused), len(refused))
        for call in refused:
            if call.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                unexpected.append(f"stream: {call.code()}")

        long_done = threading.Event()

        def long_request() -> None:
            ids = [rng.randrange(vocab) for _ in range(max_tokens)]
            t = time.perf_counter()
            try:
                with Client(address, timeout=600) as c:
                    c.encode(tokens=ids, budgets=[8])
            except ServerError as err:
                unexpected.append(f"long request: {err}")
            out["long_s"] = time.perf_counter() - t
            long_done.set()

        small_lat: list[float] = []

        def small(i: int) -> None:
            x = np.random.default_rng(i).standard_normal((1, d_in)).astype(np.float32)
            with Client(address, timeout=300) as c:
                for _ in range(200):
                    t = time.perf_counter()
                    try:
                        c.encode(activations=x, budgets=[8])
                        small_lat.append(time.perf_counter() - t)
                    except ServerError as err:
                        unexpected.append(f"small client: {err}")
                    if long_done.is_set():
                        return

        workers = [threading.Thread(target=long_request)]
        workers += [threading.Thread(target=small, args=(i,)) for i in range(small_clients)]
        events.append(("long request", time.time()))
        workers[0].start()
        time.sleep(0.5)
        events.append(("small clients", time.time()))
        for w in workers[1:]:
            w.start()
        time.sleep(1.0)
        events.append(("10 MiB text", time.time()))
        with Client(address) as c:  # the 10 MiB text again, in the middle of it all
            out["text10_busy_s"], code = ten_mb_text(c)
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                unexpected.append(f"10 MiB text under load: {code}")
        for w in workers:
            w.join()
        probes = json.loads(prober.communicate(b"", timeout=60)[0])
        for call in calls:
            if call.done() and call not in refused:
                if call.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # idle timeout
                    unexpected.append(f"open stream ended: {call.code()}")
            call.cancel()
        for f in feeds:
            f.close()
        stream_channel.close()
        out["rss_after"] = server.memory()["VmRSS"]
        rc = server.stop(timeout=180)
    except BaseException:
        server.proc.kill()
        raise
    health_lat = [lat for _, lat in probes if lat >= 0]
    health_fail = sum(lat < 0 for _, lat in probes)
    slowest = sorted(probes, key=lambda p: -p[1])[:3]
    start = events[0][1]
    out["health_slowest"] = [(round(t - start, 2), round(lat * 1e3, 1)) for t, lat in slowest]
    out["events"] = [(name, round(t - start, 2)) for name, t in events]
    small_sorted, health_sorted = sorted(small_lat), sorted(health_lat)
    out.update(
        small_requests=len(small_sorted),
        small_p50_ms=pct(small_sorted, 0.5) * 1e3,
        small_p99_ms=pct(small_sorted, 0.99) * 1e3,
        small_max_ms=small_sorted[-1] * 1e3 if small_sorted else float("nan"),
        health_checks=len(health_sorted),
        health_failures=health_fail,
        health_p99_ms=pct(health_sorted, 0.99) * 1e3,
        health_max_ms=health_sorted[-1] * 1e3 if health_sorted else float("nan"),
        unexpected=unexpected,
        exit_code=rc,
    )
    return out


_PROBE = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
out = []
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        t0, t = time.time(), time.perf_counter()
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            out.append((t0, time.perf_counter() - t))
        except grpc.RpcError:
            out.append((t0, -1.0))
        done.wait(0.05)
print(json.dumps(out))
"""
