"""Refine-readout benchmark: what the per-token refit costs next to the encoder readout.

Run from the repository root::

    .venv/bin/python benchmarks/bench_refine.py            # d_in 640, d_sae 8192, k_max 64
    .venv/bin/python benchmarks/bench_refine.py --quick    # small shapes

Each row times ``SAE.reconstruct(x, budgets)`` (one encode, every budget's reconstruction) with
``readout="encoder"`` and ``readout="refine"`` alternately in one process (median of
``--reps``) on a HierarchicalTopK SAE of the ``layer5-8192`` setting's shape. There is no
target: the refine readout is an option that buys lower FVU (``docs/pareto.md``) with compute;
this prints how much.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FULL = {"d_in": 640, "d_sae": 8192, "k": 64, "tokens": (64, 1024, 8192)}
QUICK = {"d_in": 64, "d_sae": 512, "k": 16, "tokens": (64, 512)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL

    from hsae_runtime import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=shape["d_in"], d_sae=shape["d_sae"], k_max=shape["k"]))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
    budgets = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= shape["k"]]
    print(f"# d_in={shape['d_in']} d_sae={shape['d_sae']} k_max={shape['k']}, budgets "
          f"{budgets}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| N | encoder readout | refine readout | refine / encoder | refine tokens/s |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for n in shape["tokens"]:
            x = torch.randn(n, shape["d_in"])
            times: dict[str, list[float]] = {"encoder": [], "refine": []}
            for _ in range(args.reps):
                for name in times:
                    sae.set_readout(name)
                    start = time.perf_counter()
                    sae.reconstruct(x, budgets)
                    times[name].append(time.perf_counter() - start)
            enc, ref = (statistics.median(times[k]) for k in ("encoder", "refine"))
            print(f"| {n} | {enc * 1e3:.1f} ms | {ref * 1e3:.1f} ms | {ref / enc:.2f}x | "
                  f"{n / ref:,.0f} |")


if __name__ == "__main__":
    main()
