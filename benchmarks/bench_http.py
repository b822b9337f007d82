"""HTTP/JSON vs gRPC: Encode of activation rows on one `hsae-runtime serve` process.

The server runs with ``--no-lm --http-port``: the same servicer and batcher answer both
protocols, so the difference is the transport and the body format. For 1 and 64 rows
(``d_in`` of the SAE), one client sends requests one after another and we report the median
round trip, as gRPC (raw bytes), HTTP with JSON arrays, HTTP with base64 ``data`` (request
and response) and HTTP raw bytes (``POST /v1/encode/raw``, the body the activations' bytes,
the answer the code's bytes with ``Accept: application/octet-stream``), and the ratios to
gRPC. The client's own encoding and decoding (numpy <-> JSON / base64 / bytes) is included:
it is part of what an HTTP client pays. The four forms alternate request by request, so load
from other processes hits them alike.

Run: ``python benchmarks/bench_http.py [--sae runs/P_A/models/htopk64.safetensors]``.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_common import ServerProcess, machine, median_ms  # noqa: E402

from hsae_runtime.client import Client  # noqa: E402
from hsae_runtime.format import read_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_together(fns, n: int) -> list[float]:
    """Median ms of each of ``fns``, called in turn ``n`` times each (after one warm-up)."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(n):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [median_ms(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, default=Path("runs/P_A/models/htopk64.safetensors"))
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    d_in = read_config(args.sae).d_in
    http_port = free_port()
    server = ServerProcess(args.sae, "--http-port", str(http_port))
    print(f"machine: {machine()}; SAE {args.sae.name} (d_in {d_in}), budget {args.budget}, "
          f"median of {args.requests} sequential requests")
    print("\n| rows | gRPC (ms) | HTTP JSON arrays (ms) | ÷ gRPC | HTTP base64 (ms) | ÷ gRPC "
          "| HTTP raw bytes (ms) | ÷ gRPC |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        # TCP_NODELAY as curl, requests and gRPC set it: httpx leaves Nagle on, and a body sent
        # after its headers then waits for the server's delayed ACK (~40 ms a request).
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.HTTPTransport(socket_options=nodelay)
        with Client(server.address) as grpc_client, httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", timeout=60, transport=transport
        ) as http:
            for rows in [int(r) for r in args.rows.split(",")]:
                x = np.random.default_rng(rows).standard_normal((rows, d_in)).astype(np.float32)

                def over_grpc() -> None:
                    res = grpc_client.encode(activations=x, budgets=[args.budget])
                    assert res.values.shape == (rows, args.budget)

                def over_json() -> None:
                    tensor = {"shape": [rows, d_in], "array": x.ravel().tolist()}
                    body = {"activations": tensor, "budgets": [args.budget]}
                    out = http.post("/v1/encode", json=body).raise_for_status().json()
                    values = np.asarray(out["values"]["array"], np.float32)
                    assert values.size == rows * args.budget

                def over_base64() -> None:
                    data = base64.b64encode(x.tobytes()).decode("ascii")
                    tensor = {"shape": [rows, d_in], "data": data}
                    body = {"activations": tensor, "budgets": [args.budget], "binary": True}
                    out = http.post("/v1/encode", json=body).raise_for_status().json()
                    values = np.frombuffer(base64.b64decode(out["values"]["data"]), np.float32)
                    assert values.size == rows * args.budget

                raw_params = {"shape": [rows, d_in], "budgets": [args.budget]}
                raw_headers = {"Content-Type": "application/octet-stream",
                               "Accept": "application/octet-stream"}

                def over_raw() -> None:
                    out = http.post("/v1/encode/raw", content=x.tobytes(), params=raw_params,
                                    headers=raw_headers).raise_for_status()
                    values = np.frombuffer(out.content, np.float32, rows * args.budget)
                    assert values.size == rows * args.budget

                g, j, b, r = timed_together(
                    [over_grpc, over_json, over_base64, over_raw], args.requests
                )
                print(f"| {rows} | {g:.2f} | {j:.2f} | {j / g:.2f} | {b:.2f} | {b / g:.2f} "
                      f"| {r:.2f} | {r / g:.2f} |")
            print(f"load at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
