"""Training-step benchmark: HierarchicalTopK vs TopK vs SAELens, time and peak memory.

Run from the repository root (the full shapes take ~3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/bench_step.py            # N=1024, d_in=2304, d_sae=16384, K=64
    .venv/bin/python benchmarks/bench_step.py --quick    # small shapes, seconds

A *step* is ``encode_for_training`` (k-sparse encoder backward) + loss + backward +
``Adam(fused=True)``; the two steps share one SAE and optimizer and alternate, so a ratio is
measured in one run under the same load (medians over ``--reps``). Reported:

* step time, hierarchical / TopK (target ≤ 1.15);
* step time, ours hierarchical / SAELens 6.54 TopK (target ≤ 0.5). SAELens runs in a subprocess
  from its own venv (``--saelens-python``, default ``.cache/saelens-venv/bin/python``; create it
  with ``pip install torch==2.13.0`` then ``pip install sae-lens==6.54.12``). Its step is its
  trainer's ``_train_step`` at the default TopK config: ``training_forward_pass``, firing
  statistics, backward, ``clip_grad_norm_``, plain ``Adam``. Without that venv the row says
  "skipped";
* peak RSS of a fresh process running the step, hierarchical / TopK (target ≤ 1.1), also with
  the cumulative-sum reference loss for contrast;
* the isolated loss forward + backward of each implementation vs ``topk_loss``.

Set ``THP_MEM_ALLOC_ENABLE=1`` to let torch back large tensors with transparent huge pages (it
changes absolute times of both steps; the ratios are what we report).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = {"n": 1024, "d_in": 2304, "d_sae": 16384, "k": 64}
QUICK = {"n": 128, "d_in": 256, "d_sae": 2048, "k": 32}

SAELENS_STEP = r"""
import json, statistics, sys, time
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

n, d_in, d_sae, k, reps, threads = (int(a) for a in sys.argv[1:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32",
                                            device="cpu"))
opt = torch.optim.Adam(sae.parameters(), lr=5e-5, betas=(0.9, 0.999))  # as its trainer
x = torch.randn(n, d_in)
dead = torch.zeros(d_sae, dtype=torch.bool)
since_fired = torch.zeros(d_sae)
act_freq = torch.zeros(d_sae)

def step(i):  # SAETrainer._train_step without logging and schedulers
    sae.train()
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=i,
        is_logging_step=False))
    with torch.no_grad():
        firing = out.feature_acts.bool().float()
        did_fire = firing.sum(-2).bool()
        since_fired.add_(1)
        since_fired[did_fire] = 0
        act_freq.add_(firing.sum(0))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()

times = []
for i in range(reps + 1):
    t = time.perf_counter(); step(i); times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times[1:]), "times": times[1:]}))
"""


def build(shape: dict[str, int]):
    from hsae_runtime import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=shape["d_in"], d_sae=shape["d_sae"], k_max=shape["k"]))
    opt = torch.optim.Adam(sae.parameters(), lr=5e-5, fused=True)
    x = torch.randn(shape["n"], shape["d_in"])
    return sae, opt, x


def make_step(sae, opt, x, k: int, loss: str):
    from hsae_runtime import hierarchical_topk_loss, topk_loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        values, indices = sae.encode_for_training(x, k)
        if loss == "topk":
            value = topk_loss(x, values, indices, sae.W_dec, sae.b_dec)
        else:
            impl = "auto" if loss == "hier" else loss.removeprefix("hier-")
            value = hierarchical_topk_loss(x, values, indices, sae.W_dec, sae.b_dec, impl=impl)
        value.backward()
        opt.step()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memory(shape: dict[str, int], loss: str) -> None:
    """Runs in a fresh process: peak RSS of a few steps (printed as JSON)."""
    sae, opt, x = build(shape)
    step = make_step(sae, opt, x, shape["k"], loss)
    base = rss_mb()
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(json.dumps({"base_mb": base, "peak_mb": peak}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_steps(shape: dict[str, int], reps: int) -> dict[str, float]:
    sae, opt, x = build(shape)
    steps = {name: make_step(sae, opt, x, shape["k"], name) for name in ("hier", "topk")}
    for step in steps.values():  # warm-up: kernels compile (cached on disk after the first run)
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_saelens(shape: dict[str, int], reps: int, python: Path) -> float | None:
    if not python.exists():
        return None
    sizes = [str(shape[key]) for key in ("n", "d_in", "d_sae", "k")]
    argv = [str(python), "-c", SAELENS_STEP, *sizes, str(reps), str(torch.get_num_threads())]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def bench_losses(shape: dict[str, int], reps: int, impls: list[str], *, device: str = "cpu",
                 timer=timed) -> dict[str, float]:
    """Median seconds of one loss forward + backward per implementation (and ``topk``).

    ``timer(fn) -> seconds`` times one call (``bench_step_gpu.py`` passes a CUDA-event timer).
    """
    from hsae_runtime import hierarchical_topk_loss, topk_loss

    n, d_in, d_sae, k = shape["n"], shape["d_in"], shape["d_sae"], shape["k"]
    torch.manual_seed(0)
    x = torch.randn(n, d_in, device=device)
    values = torch.rand(n, k, device=device).sort(dim=1, descending=True).values.requires_grad_()
    indices = torch.randint(0, d_sae, (n, k), device=device)
    W_dec = torch.randn(d_sae, d_in, device=device).div_(d_in**0.5).requires_grad_()
    b_dec = torch.zeros(d_in, device=device, requires_grad=True)

    def run(impl: str):
        def fwd_bwd() -> None:
            values.grad = W_dec.grad = b_dec.grad = None
            if impl == "topk":
                loss = topk_loss(x, values, indices, W_dec, b_dec)
            else:
                loss = hierarchical_topk_loss(x, values, indices, W_dec, b_dec, impl=impl)
            loss.backward()

        return fwd_bwd

    fns = {impl: run(impl) for impl in ["topk", *impls]}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(reps):
        for impl, fn in fns.items():
            times[impl].append(timer(fn))
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--saelens-python", type=Path,
                        default=ROOT / ".cache" / "saelens-venv" / "bin" / "python")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.child_memory:
        child_memory(shape, args.child_memory)
        return
    reps = args.reps or (3 if args.quick else 7)
    quick = ["--quick"] if args.quick else []

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# shapes {shape}, float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{stamp}")
    steps = bench_steps(shape, reps)
    saelens = bench_saelens(shape, max(2, reps // 2), args.saelens_python)
    mem = {loss: run_child([*quick, "--child-memory", loss])
           for loss in ("topk", "hier", "hier-reference")}
    loss_impls = ["reference", "flat", "cpu"]
    losses = bench_losses(shape, max(2, reps // 2), loss_impls)

    rows = [
        ("step: hierarchical / TopK", f"{steps['hier']:.3f} s / {steps['topk']:.3f} s",
         steps["hier"] / steps["topk"], "<= 1.15"),
        ("step: ours hierarchical / SAELens TopK",
         f"{steps['hier']:.3f} s / {saelens:.3f} s" if saelens else "skipped (no SAELens venv)",
         steps["hier"] / saelens if saelens else None, "<= 0.5"),
        ("peak RSS: hierarchical / TopK",
         f"{mem['hier']['peak_mb']:.0f} MB / {mem['topk']['peak_mb']:.0f} MB",
         mem["hier"]["peak_mb"] / mem["topk"]["peak_mb"], "<= 1.1"),
        ("peak RSS growth in the steps (grads, Adam, temporaries): hier / TopK",
         f"{mem['hier']['peak_mb'] - mem['hier']['base_mb']:.0f} MB / "
         f"{mem['topk']['peak_mb'] - mem['topk']['base_mb']:.0f} MB",
         (mem["hier"]["peak_mb"] - mem["hier"]["base_mb"])
         / (mem["topk"]["peak_mb"] - mem["topk"]["base_mb"]), ""),
        ("peak RSS: hier (cumsum reference loss) / TopK",
         f"{mem['hier-reference']['peak_mb']:.0f} MB / {mem['topk']['peak_mb']:.0f} MB",
         mem["hier-reference"]["peak_mb"] / mem["topk"]["peak_mb"], ""),
    ]
    for impl in loss_impls:
        rows.append((f"loss fwd+bwd: {impl} / topk_loss",
                     f"{losses[impl]:.3f} s / {losses['topk']:.3f} s",
                     losses[impl] / losses["topk"], ""))
    print("| measurement | values | ratio | target |")
    print("|---|---|---|---|")
    for name, values, ratio, target in rows:
        print(f"| {name} | {values} | {'' if ratio is None else f'{ratio:.2f}'} | {target} |")


if __name__ == "__main__":
    main()
