"""HTTP/JSON vs gRPC: Encode of activation rows on one `hsae-runtime serve` process.

The server runs with ``--no-lm --http-port``: the same servicer and batcher answer both
protocols, so the difference is the transport and the body format. For 1 and 64 rows
(``d_in`` of the SAE), one client sends requests one after another and we report the median
round trip, as gRPC (raw bytes), HTTP with JSON arrays and HTTP with base64 ``data``
(request and response), and the ratios to gRPC. The client's own encoding and decoding
(numpy <-> JSON / base64) is included: it is part of what an HTTP client pays.

Run: ``python benchmarks/bench_http.py [--sae runs/P_A/models/htopk64.safetensors]``.
"""

from __future__ import annotations

import argparse
import base64
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


def timed(fn, n: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median_ms(samples)


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
    print("\n| rows | gRPC (ms) | HTTP JSON arrays (ms) | ÷ gRPC | HTTP base64 (ms) | ÷ gRPC |")
    print("|---|---|---|---|---|---|")
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

                g = timed(over_grpc, args.requests)
                j = timed(over_json, args.requests)
                b = timed(over_base64, args.requests)
                print(f"| {rows} | {g:.2f} | {j:.2f} | {j / g:.2f} | {b:.2f} | {b / g:.2f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
