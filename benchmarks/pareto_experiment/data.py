"""Stages 1-2: split the text into train / held-out documents, and cache their activations.

Both outputs live under ``cache_root`` (``--cache-dir``, default ``--out``) so several runs can
share them; the activation cache is keyed on the split files' paths and mtimes.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .settings import Settings

logger = logging.getLogger("pareto")  # one logger name for every module of the experiment
_TITLE = re.compile(r"^ ?= [^=].* = ?$")  # " = Title = " (not " = = Section = = ")


# ---------------------------------------------------------------------------- 1. split
def split_documents(s: Settings, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """Write ``data/train.txt`` and ``data/eval.txt`` (one blank-line block per document)."""
    from hsae_runtime.errors import DataError

    path = Path(s.data).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {s.data}",
                        hint="the benchmark reads ../shared/data/wikitext2-valid.txt relative to "
                        "the repository root; pass --data FILE to use another text")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs: list[list[str]] = []
    if any(_TITLE.match(line) for line in lines):
        for line in lines:
            if _TITLE.match(line) or not docs:
                docs.append([])
            if line.strip():
                docs[-1].append(line.strip())
    else:
        from hsae_runtime.training.data import read_documents

        docs = [[ln for ln in d.splitlines() if ln.strip()] for d in read_documents(path)]
    docs = [d for d in docs if d][: s.max_docs]
    train = [d for i, d in enumerate(docs) if i % s.eval_every != s.eval_every - 1]
    held = [d for i, d in enumerate(docs) if i % s.eval_every == s.eval_every - 1]
    if not train or not held:
        raise DataError(f"{s.data} has {len(docs)} documents; need at least {s.eval_every}")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", train), ("eval", held)):
        p = folder / f"{name}.txt"
        text = "\n\n".join("\n".join(d) for d in part) + "\n"
        # Rewrite only on change: the activation cache is keyed on the file's mtime.
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1], {"documents": len(docs), "train_docs": len(train),
                                "eval_docs": len(held)}


# ---------------------------------------------------------------------------- 2. cache
def cache_activations(s: Settings, lm: Any, text: Path, folder: Path, block_contexts: int):
    """Fill (or reuse) the activation cache for ``text``; returns the ActivationCache."""
    from hsae_runtime.lm import resolve_hookpoint
    from hsae_runtime.training.buffer import ActivationCache, BlockSource, LMActivationSource

    source = LMActivationSource(lm, resolve_hookpoint(lm.model, s.hookpoint), text,
                                context=s.context, block_contexts=block_contexts,
                                lm_batch=s.lm_batch)
    cache = ActivationCache(folder, source.key(), "float32")
    if not cache.complete:
        t0 = time.perf_counter()
        n = sum(len(a) for _, a in BlockSource(source, cache).blocks())
        logger.info("cached %d tokens of %s in %.0f s (%.0f tok/s)", n, text.name,
                    time.perf_counter() - t0, n / (time.perf_counter() - t0))
    return cache


def load_cache(cache: Any) -> Tensor:
    return torch.cat([a for _, a in cache.blocks()])  # (N, d_in)
