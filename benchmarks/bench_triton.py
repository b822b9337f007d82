"""16 concurrent single-row clients: Triton (dynamic batching on / off) vs ``hsae-runtime serve``.

One SAE (``--model``, default the trained ``runs/P_A/models/htopk64.safetensors`` when present,
else a random SAE of the same shape: d_in 640, d_sae 4096, k_max 64), no LM: every request
carries one activation row and asks for its code at k_max. Three front ends stay up side by side
(idle ones cost no CPU):

- ``triton_on``  — the exported Python-backend model with dynamic batching (the export default,
  ``--queue-delay-us 100``), gRPC;
- ``triton_off`` — the same model without dynamic batching, gRPC;
- ``serve``      — ``hsae-runtime serve MODEL --no-lm`` with its default batching, gRPC.

Each of ``--rounds`` rounds measures them in turn for ``--seconds`` each (interleaved, so a slow
spell of a shared machine hits every setting); the table pools all rounds: requests per second,
p50 and p99 latency. Run: ``python benchmarks/bench_triton.py`` (needs the ``triton`` extra).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from serving_common import ServerProcess, machine

from hsae_runtime.config import SAEConfig
from hsae_runtime.exporters.triton_repo import export_triton_python_repo
from hsae_runtime.exporters.triton_server import TritonPorts, TritonServer
from hsae_runtime.sae import SAE

DEFAULT_MODEL = Path("runs/P_A/models/htopk64.safetensors")
CLIENTS = 16


def load_sae(path: Path | None, folder: Path) -> tuple[SAE, Path, str]:
    if path is not None and path.is_file():
        return SAE.load(path), path, str(path)
    sae = SAE(SAEConfig(d_in=640, d_sae=4096, k_max=64))
    out = folder / "random.safetensors"
    sae.save(out)
    return sae, out, "random SAE (d_in 640, d_sae 4096, k_max 64)"


def triton_caller(url: str, model: str, row: np.ndarray, k_max: int) -> Callable[[], None]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", list(row.shape), "FP32")
    x.set_data_from_numpy(row)
    k = grpcclient.InferInput("k", [1, 1], "INT64")
    k.set_data_from_numpy(np.array([[k_max]], dtype=np.int64))
    outputs = [grpcclient.InferRequestedOutput("values"),
               grpcclient.InferRequestedOutput("indices")]

    def call() -> None:
        client.infer(model, [x, k], outputs=outputs).as_numpy("indices")

    return call


def serve_caller(address: str, row: np.ndarray, k_max: int) -> Callable[[], None]:
    from hsae_runtime.client import Client

    client = Client(address, timeout=300)

    def call() -> None:
        client.encode(activations=row, budgets=[k_max])

    return call


def measure(callers: list[Callable[[], None]], seconds: float) -> tuple[int, float, list[float]]:
    """Every caller in its own thread for ``seconds``: (requests, elapsed s, latencies s)."""
    for call in callers:
        call()  # connect and warm up before the clock
    barrier = threading.Barrier(len(callers) + 1)
    latencies: list[list[float]] = [[] for _ in callers]
    errors: list[BaseException] = []
    stop_at = [0.0]

    def run(i: int) -> None:
        try:
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                callers[i]()
                latencies[i].append(time.perf_counter() - t)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples), q)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port-base", type=int, default=18400)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        folder = Path(tmp)
        sae, model_path, label = load_sae(args.model, folder)
        cfg = sae.config
        export_triton_python_repo(sae, folder / "repo", name="triton_on", model_file=model_path)
        export_triton_python_repo(sae, folder / "repo", name="triton_off", model_file=model_path,
                                  queue_delay_us=None)
        rows = np.random.default_rng(0).standard_normal((CLIENTS, 1, cfg.d_in)).astype(np.float32)
        base = args.port_base
        triton = TritonServer(folder / "repo", ports=TritonPorts(base, base + 1, base + 2),
                              log_file=folder / "tritonserver.log")
        serve = ServerProcess(model_path)
        try:
            with triton:
                callers = {
                    name: [triton_caller(triton.grpc_url, name, r, cfg.k_max) for r in rows]
                    for name in ("triton_on", "triton_off")
                }
                callers["serve"] = [serve_caller(serve.address, r, cfg.k_max) for r in rows]
                pooled = {name: [0, 0.0, []] for name in callers}
                for rnd in range(args.rounds):
                    for name, group in callers.items():
                        n, elapsed, lat = measure(group, args.seconds)
                        pooled[name][0] += n
                        pooled[name][1] += elapsed
                        pooled[name][2].extend(lat)
                        print(f"round {rnd + 1} {name}: {n / elapsed:.0f} req/s")
        finally:
            serve.stop()

    print(f"\n{CLIENTS} concurrent single-row gRPC clients, codes at k={cfg.k_max}; {label}")
    print(f"machine: {machine()}")
    print(f"{args.rounds} interleaved rounds x {args.seconds:.0f} s per front end\n")
    print("| front end | req/s | p50 ms | p99 ms | requests |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, (n, elapsed, lat) in pooled.items():
        rates[name] = n / elapsed
        print(f"| {name} | {rates[name]:.0f} | {percentile(lat, 50):.2f} | "
              f"{percentile(lat, 99):.2f} | {n} |")
    print(f"\nTriton batching on / off: {rates['triton_on'] / rates['triton_off']:.1f}x; "
          f"fastest: {max(rates, key=lambda k: rates[k])}")


if __name__ == "__main__":
    main()
