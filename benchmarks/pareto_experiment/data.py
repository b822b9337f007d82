"""Stages 1-2: split the text into train / validation / eval documents, and cache activations.

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
PARTS = ("train", "val", "eval")


def split_documents(s: Settings, out: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """Write ``data/{train,val,eval}.txt`` (one blank-line block per document).

    Documents are WikiText articles when the file has `` = Title = `` headings, otherwise
    blank-line blocks; they go to the three parts by a seeded shuffle
    (:func:`hsae_runtime.training.data.split_documents`): train fits the SAEs, validation
    makes every choice, eval is only reported.
    """
    from hsae_runtime.errors import DataError
    from hsae_runtime.training.data import read_documents
    from hsae_runtime.training.data import split_documents as split_docs

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
        docs = [[ln for ln in d.splitlines() if ln.strip()] for d in read_documents(path)]
    texts = ["\n".join(d) for d in docs if d][: s.max_docs]
    if len(texts) < 3:
        raise DataError(f"{s.data} has {len(texts)} documents; need at least 3 "
                        "(train, validation, eval)")
    split = split_docs(texts, val_fraction=s.val_fraction, eval_fraction=s.eval_fraction,
                       seed=s.split_seed)
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in PARTS:
        p = folder / f"{name}.txt"
        text = "\n\n".join(getattr(split, name)) + "\n"
        # Rewrite only on change: the activation cache is keyed on the file's mtime.
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
        paths[name] = p
    return paths, {"documents": len(texts), "split_seed": s.split_seed,
                   **{f"{name}_docs": len(getattr(split, name)) for name in PARTS}}


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
