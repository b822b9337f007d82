"""Training-step benchmark on a CUDA card: HierarchicalTopK vs TopK, time and peak memory.

The GPU counterpart of ``bench_step.py`` (which is CPU-only), for orientation against the
paper's numbers (their Triton kernel: 1.26× a TopK step per step on GPU, their torch.compile
reference 1.99×). Run from the repository root on a machine with CUDA::

    python benchmarks/bench_step_gpu.py            # the core issue's shapes and two larger ones
    python benchmarks/bench_step_gpu.py --quick    # one small shape

A *step* is ``encode_for_training`` + loss + backward + ``Adam(fused=True)``, both steps sharing
one SAE and alternating (CUDA-event timing, median over ``--reps``). Peak memory is
``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it. The
isolated loss forward + backward of each implementation (``triton``, ``flat``, ``reference``)
is reported against ``topk_loss`` at the same shape. Without CUDA it prints "skipped".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_step import bench_losses, make_step  # benchmarks/ is on sys.path when run as a script

SHAPES = [  # (N, d_in, d_sae, K)
    (1024, 2304, 16384, 64),
    (4096, 2304, 65536, 64),
    (4096, 2304, 65536, 128),
]
QUICK = [(512, 512, 4096, 32)]


def cuda_time(fn) -> float:
    """Seconds of GPU time for one call of ``fn``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_shape(n: int, d_in: int, d_sae: int, k: int, reps: int) -> dict[str, float]:
    from hsae_runtime import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k_max=k)).cuda()
    opt = torch.optim.Adam(sae.parameters(), lr=5e-5, fused=True)
    x = torch.randn(n, d_in, device="cuda")
    steps = {name: make_step(sae, opt, x, k, name) for name in ("hier", "topk")}
    for step in steps.values():  # warm-up: Triton compiles, Adam state is allocated
        step()
        step()
    out: dict[str, float] = {}
    for name, step in steps.items():
        out[f"{name}_peak"] = peak_bytes(step)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(cuda_time(step))
    out.update({f"{name}_s": statistics.median(t) for name, t in times.items()})

    shape = {"n": n, "d_in": d_in, "d_sae": d_sae, "k": k}
    losses = bench_losses(shape, reps, ["triton", "flat", "reference"], device="cuda",
                          timer=cuda_time)
    out.update({f"loss_{impl}_s": t for impl, t in losses.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as on CPU; the ratio is the claim
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, float32, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| N | d_in | d_sae | K | hier step | topk step | step ratio (target ≤ 1.15) "
          "| peak mem ratio (≤ 1.1) | loss fwd+bwd triton / flat / reference ÷ topk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, d_in, d_sae, k in QUICK if args.quick else SHAPES:
        r = bench_shape(n, d_in, d_sae, k, args.reps)
        torch.cuda.empty_cache()
        losses = " / ".join(f"{r[f'loss_{i}_s'] / r['loss_topk_s']:.2f}"
                            for i in ("triton", "flat", "reference"))
        print(f"| {n} | {d_in} | {d_sae} | {k} | {r['hier_s'] * 1e3:.2f} ms "
              f"| {r['topk_s'] * 1e3:.2f} ms | {r['hier_s'] / r['topk_s']:.3f} "
              f"| {r['hier_peak'] / r['topk_peak']:.3f} | {losses} |", flush=True)


if __name__ == "__main__":
    main()
