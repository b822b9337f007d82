"""Decode benchmark: sparse ``SAE.decode`` (embedding_bag over k rows) vs a dense decode.

Run from the repository root::

    .venv/bin/python benchmarks/bench_decode.py            # d_in=2304, d_sae=16384, k=64
    .venv/bin/python benchmarks/bench_decode.py --quick    # small shapes

The dense decode scatters the code into an ``[N, d_sae]`` activation and multiplies by
``W_dec`` (what SAELens's TopK decode does); the sparse one gathers k decoder rows per token.
Both run alternately in one process (median of ``--reps``). Target: sparse ≥ 20× faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FULL = {"d_in": 2304, "d_sae": 16384, "k": 64, "tokens": (256, 1024)}
QUICK = {"d_in": 256, "d_sae": 2048, "k": 32, "tokens": (64, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions (median)")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL

    from hsae_runtime import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=shape["d_in"], d_sae=shape["d_sae"], k_max=shape["k"]))
    print(f"# d_in={shape['d_in']} d_sae={shape['d_sae']} k={shape['k']}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| N | sparse decode | dense decode | dense / sparse | target |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for n in shape["tokens"]:
            code = sae.encode(torch.randn(n, shape["d_in"]), shape["k"])
            torch.testing.assert_close(sae.decode(code), sae.decode_dense(code),
                                       rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {"sparse": [], "dense": []}
            for _ in range(args.reps):
                for name, fn in (("sparse", sae.decode), ("dense", sae.decode_dense)):
                    start = time.perf_counter()
                    fn(code)
                    times[name].append(time.perf_counter() - start)
            sparse, dense = (statistics.median(times[k]) for k in ("sparse", "dense"))
            print(f"| {n} | {sparse * 1e3:.1f} ms | {dense * 1e3:.1f} ms | {dense / sparse:.1f}x "
                  "| >= 20x |")


if __name__ == "__main__":
    main()
