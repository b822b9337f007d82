"""Smoke test of ``benchmarks/pareto.py --quick`` end to end on the tiny random Gemma-2.

The real experiment (Gemma-3 270M, ~1 h) is run by hand; this checks that every stage runs and
writes what the docs promise: a document split, activation caches, one model file per SAE,
FVU / dead % at every budget, CE deltas (the batched splice cross-checks itself against
``hsae_runtime.lm.splice`` on the first context), ``results.json``, ``table.md`` and the plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
# benchmarks/pareto.py is a thin script over the pareto_experiment package there (not installed).
sys.path.insert(0, str(REPO / "benchmarks"))

from pareto_experiment.data import split_documents  # noqa: E402
from pareto_experiment.run import main  # noqa: E402
from pareto_experiment.settings import Settings  # noqa: E402


@pytest.mark.timeout(120)
def test_quick_mode_end_to_end(tiny_lm_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pareto"
    argv = ["--quick", "--lm", str(tiny_lm_dir), "--data", str(tiny_text_file), "--out", str(out),
            "--tokens", "4096", "--timing-rounds", "2", "--timing-steps", "1",
            "--ce-tokens", "200", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:  # --threads 1 caps this process's pools; give the rest of the session its threads
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        except ImportError:
            pass

    results = json.loads((out / "results.json").read_text())
    names = ["htopk16", "topk4", "topk8", "topk16"]
    assert sorted(results["fvu"]) == sorted(names)
    for name in names:
        assert (out / "models" / f"{name}.safetensors").is_file()
        fvus = [results["fvu"][name][str(k)]["fvu"] for k in (1, 2, 4, 8, 16)]
        assert all(math.isfinite(f) and f >= 0 for f in fvus)
        assert all(0 <= results["fvu"][name][str(k)]["fvu_token"] < 10 for k in (1, 16))
    hier = [results["fvu"]["htopk16"][str(k)]["fvu"] for k in (1, 2, 4, 8, 16)]
    assert hier[-1] < hier[0], "the hierarchical SAE must improve with the budget"
    assert results["split"] == {"documents": 20, "split_seed": 0, "train_docs": 14,
                                "val_docs": 2, "eval_docs": 4}  # --max-docs 20
    assert sorted(results["fvu_val"]) == sorted(names) and results["chosen_on"].startswith("val")
    assert results["ce"]["contexts_done"] == results["ce"]["contexts"] >= 1
    assert len(results["ce"]["delta"]) == len(names) * 5
    assert set(results["step_time_s"]) == set(names)
    assert "FVU ratio HTopK/TopK-8 at k=8" in results["summary"]
    assert (out / "table.md").read_text().count("| htopk16 |") == 7  # 7 tables
    assert (out / "pareto.png").stat().st_size > 10_000


def test_missing_data_file_is_a_clear_error(tmp_path: Path) -> None:
    from hsae_runtime.errors import DataError

    settings = Settings(out=str(tmp_path), data=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="shared/data/wikitext2-valid.txt"):
        split_documents(settings, tmp_path)


def test_wikitext_headings_split_documents(tmp_path: Path) -> None:
    text = "".join(f" \n = Article {i} = \n \n Body {i} .\n \n = = Section = = \n More {i} .\n"
                   for i in range(10))
    data = tmp_path / "wiki.txt"
    data.write_text(text)
    settings = Settings(out=str(tmp_path), data=str(data), val_fraction=0.1, eval_fraction=0.2)
    parts, split = split_documents(settings, tmp_path)
    assert split == {"documents": 10, "split_seed": 0, "train_docs": 7, "val_docs": 1,
                     "eval_docs": 2}
    texts = {name: parts[name].read_text() for name in ("train", "val", "eval")}
    for name, text in texts.items():
        for doc in text.strip().split("\n\n"):  # whole articles: heading, body and sections
            i = doc.split("Article ")[1].split(" ")[0]
            assert doc.startswith(f"= Article {i} =") and f"More {i} ." in doc
            others = [t for n, t in texts.items() if n != name]
            assert all(f"Article {i} =" not in t for t in others), (name, i)
