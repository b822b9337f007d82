"""Run the whole experiment: every stage in order, resuming from what ``--out`` holds.

``main`` is what ``benchmarks/pareto.py`` and ``python -m pareto_experiment`` call: it parses
the flags, runs, and prints ``table.md``. Results are saved after every model and every CE
context, so a killed run still leaves a partial report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .data import cache_activations, load_cache, split_documents
from .evaluate import eval_ce, eval_fvu
from .report import summarise, write_report
from .settings import REPO, Settings, cache_root, parse_args
from .train import time_steps, train_one, train_order

logger = logging.getLogger("pareto")  # one logger name for every module of the experiment


def _tiny_lm(out: Path) -> str:
    """The tests' tiny random Gemma-2 + tokenizer, built once under ``out`` (quick mode)."""
    folder = out / "tiny_lm"
    if not (folder / "config.json").is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("_conftest", REPO / "tests" / "conftest.py")
        assert spec is not None and spec.loader is not None
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        folder.mkdir(parents=True, exist_ok=True)
        tok = conftest.build_tiny_tokenizer(folder)
        conftest.build_tiny_lm(folder, vocab_size=len(tok))
    return str(folder)


def run(s: Settings) -> dict[str, Any]:
    from hsae_runtime.gguf import gemma3_270m_path
    from hsae_runtime.lm import load_lm
    from hsae_runtime.sae import SAE

    if s.threads:
        torch.set_num_threads(s.threads)
        try:  # numba's kernels have their own pool; cap it too (never via the env var, which
            import numba  # numba refuses to change once its threads have started)

            numba.set_num_threads(min(s.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    parts, split = split_documents(s, cache_root(s))
    train_txt, eval_txt = parts["train"], parts["eval"]
    lm_name = s.lm or (_tiny_lm(out) if s.quick else str(gemma3_270m_path()))
    lm = load_lm(lm_name, device="cpu")
    timings["load_lm_s"] = time.perf_counter() - t
    # One block holds every training context, so each pass shuffles over the whole train part.
    block_contexts = 1 << 20
    t = time.perf_counter()
    train_cache = cache_activations(s, lm, train_txt, cache_root(s) / "cache" / "train",
                                    block_contexts)
    timings["cache_s"] = time.perf_counter() - t
    train_acts = load_cache(train_cache)

    # Train every SAE first, then evaluate; a killed run keeps the finished models.
    stats: dict[str, Any] = {}
    for name, objective, k in train_order(s):
        path = out / "models" / f"{name}.safetensors"
        if s.train:
            t = time.perf_counter()
            stats[name] = train_one(s, lm_name, train_txt, block_contexts, out, name,
                                    objective, k)
            timings["train_s"] = timings.get("train_s", 0.0) + time.perf_counter() - t
        elif path.is_file():
            stats[name] = json.loads((out / "models" / f"{name}.json").read_text())
        else:
            logger.warning("no %s (--no-train): left out of the report", path)
    times_path = out / "step_times.json"
    step_times: dict[str, float] = (json.loads(times_path.read_text())
                                    if times_path.is_file() else {})
    if s.train and s.timing_rounds > 1:
        t = time.perf_counter()
        step_times = time_steps(s, train_acts)
        times_path.write_text(json.dumps(step_times, indent=2))
        timings["step_timing_s"] = time.perf_counter() - t
        logger.info("median s/step: %s", {k: round(v, 4) for k, v in step_times.items()})

    t = time.perf_counter()
    held = {name: load_cache(cache_activations(s, lm, parts[name], cache_root(s) / "cache" / name,
                                               block_contexts)) for name in ("val", "eval")}
    timings["cache_s"] += time.perf_counter() - t
    eval_acts = held["eval"]
    logger.info("activations: %d train, %d validation, %d eval tokens (d=%d)", len(train_acts),
                len(held["val"]), len(eval_acts), train_acts.shape[1])
    results: dict[str, Any] = {
        "settings": asdict(s), "lm": Path(lm_name).name, "split": split,
        "chosen_on": "val: every recipe choice was made on the validation documents; the eval "
                     "documents are only reported",
        "train_tokens_unique": len(train_acts), "val_tokens": len(held["val"]),
        "eval_tokens": len(eval_acts), "fvu_val": {}, "objective": {},
        "train_tokens": s.tokens // s.batch_tokens * s.batch_tokens,
        "passes": s.tokens / len(train_acts), "fvu": {}, "training": stats,
        "step_time_s": step_times, "timings_s": timings, "ce": None,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }

    def save() -> None:
        results["summary"] = summarise(s, results["fvu"], results["step_time_s"],
                                       results["training"], results["ce"], results["fvu_val"])
        write_report(s, results, out)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    saes: dict[str, Any] = {}
    specs = {name: (objective, k) for name, objective, k in train_order(s)}
    for name in stats:
        t = time.perf_counter()
        saes[name] = SAE.load(out / "models" / f"{name}.safetensors").set_readout(s.readout)
        fvu = eval_fvu(saes[name], eval_acts, list(s.eval_ks))
        results["fvu"][name] = {str(k): v for k, v in fvu.items()}
        results["objective"][name] = objective_by_part(
            saes[name], specs[name], {"train": train_acts, **held})
        val = eval_fvu(saes[name], held["val"], list(s.eval_ks))
        results["fvu_val"][name] = {str(k): v for k, v in val.items()}
        logger.info("%s validation FVU: %s", name, {k: round(v["fvu"], 4) for k, v in val.items()})
        timings["eval_fvu_s"] = timings.get("eval_fvu_s", 0.0) + time.perf_counter() - t
        logger.info("%s FVU: %s", name, {k: round(v["fvu"], 4) for k, v in fvu.items()})
        save()
    save()  # an FVU-only report exists before the slow CE stage
    if s.ce_tokens > 0:
        t = time.perf_counter()

        def save_ce(ce: dict[str, Any]) -> None:  # after every context: partial results survive
            results["ce"] = ce
            timings["eval_ce_s"] = time.perf_counter() - t
            save()

        save_ce(eval_ce(s, lm, saes, eval_txt, out, on_context=save_ce))
    logger.info("timings: %s", {k: round(v) for k, v in timings.items()})
    return results


def objective_by_part(sae: Any, spec: tuple[str, int], parts: dict[str, Any],
                      tokens: int = 16_384) -> dict[str, float]:
    """The SAE's own training objective (raw units) on the first ``tokens`` of each part: train
    next to validation and eval shows whether a recipe overfits the small train part."""
    from hsae_runtime.training.validation import objective_loss

    objective, k = spec
    budgets = list(range(1, k + 1))
    return {part: objective_loss(sae, acts[:tokens], objective, k, budgets)
            for part, acts in parts.items()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    s = parse_args(argv)
    results = run(s)
    sys.stdout.write((Path(s.out) / "table.md").read_text())
    return 0 if results["fvu"] else 1
