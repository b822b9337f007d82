"""Text sources and fixed-length token contexts.

Sources: ``.txt`` (one document per blank-line separated block, or per line), ``.jsonl``
(a ``text`` field per line) and, when the ``datasets`` package and the network are there,
``hf:NAME[:CONFIG][:SPLIT]`` streamed from the Hugging Face hub.

Documents are tokenised without special tokens, joined with EOS, and cut into contexts of
``context`` tokens that each start with BOS (as the LM saw text in pre-training). Contexts are
numbered in order so that a trainer can skip to any block of them without running the LM.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from hsae_runtime.errors import DataError

logger = logging.getLogger(__name__)

TxtSplit = Literal["blank", "line"]


def read_documents(source: str | Path, *, txt_split: TxtSplit = "blank") -> Iterator[str]:
    """Yield non-empty documents from a .txt / .jsonl file or an ``hf:`` dataset name."""
    name = str(source)
    if name.startswith("hf:"):
        yield from _hf_documents(name[3:])
        return
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file not found: {name}",
            hint="pass a .txt or .jsonl file, or hf:DATASET[:CONFIG][:SPLIT]",
        )
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: each JSON line needs a string 'text' field")
                if text.strip():
                    yield text
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        match txt_split:
            case "line":
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\n")
            case "blank":
                block: list[str] = []
                for line in fh:
                    if line.strip():
                        block.append(line.rstrip("\n"))
                    elif block:
                        yield "\n".join(block)
                        block = []
                if block:
                    yield "\n".join(block)
            case other:
                raise ValueError(f"unknown txt_split {other!r}")


def _hf_documents(spec: str) -> Iterator[str]:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise DataError(
            "hf: data needs the 'datasets' package",
            hint="pip install datasets, or use a local file"
        ) from err
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for record in stream:
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text
    except (OSError, ConnectionError, ValueError) as err:
        raise DataError(
            f"could not stream hf:{spec} ({type(err).__name__}: {err})",
            hint="the hub may be unreachable; download the text and pass a local .txt / .jsonl",
        ) from err


def iter_contexts(
    documents: Iterator[str], tokenizer: Any, context: int, *, batch_docs: int = 64
) -> Iterator[Tensor]:
    """Yield int64 contexts ``[context]``: BOS then ``context - 1`` tokens of EOS-joined text.

    The final partial context is dropped (fixed shapes keep LM batches free of padding).
    """
    if context < 2:
        raise DataError(f"context must be at least 2 tokens, got {context}")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    body = context - 1 if bos is not None else context
    pending: list[int] = []

    def flush() -> Iterator[Tensor]:
        nonlocal pending
        start = 0
        while len(pending) - start >= body:
            chunk = pending[start : start + body]
            start += body
            yield torch.tensor(([bos] if bos is not None else []) + chunk, dtype=torch.int64)
        pending = pending[start:]

    docs: list[str] = []
    for doc in documents:
        docs.append(doc)
        if len(docs) >= batch_docs:
            for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
                pending.extend(ids)
                if eos is not None:
                    pending.append(eos)
            docs = []
            yield from flush()
    if docs:
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            pending.extend(ids)
            if eos is not None:
                pending.append(eos)
        yield from flush()


@dataclass(frozen=True)
class DocumentSplit:
    """Whole documents in three disjoint parts: fit on train, choose on val, report eval."""

    train: list[str]
    val: list[str]
    eval: list[str]


def split_documents(
    documents: list[str], *, val_fraction: float, eval_fraction: float, seed: int = 0
) -> DocumentSplit:
    """Split whole documents (never tokens) into train / validation / eval by a seeded shuffle.

    A part with a positive fraction gets at least one document. Every choice (learning rate,
    early stopping, any threshold) is made on ``val``; ``eval`` is only ever reported.
    """
    for name, value in (("val_fraction", val_fraction), ("eval_fraction", eval_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{name} must lie in [0, 1), got {value}")
    if val_fraction + eval_fraction >= 1:
        raise DataError("val_fraction + eval_fraction must leave documents to train on")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=gen).tolist()

    def count(fraction: float) -> int:
        return max(1, round(len(documents) * fraction)) if fraction > 0 and documents else 0

    n_eval, n_val = count(eval_fraction), count(val_fraction)
    if documents and n_eval + n_val >= len(documents):
        raise DataError(f"{len(documents)} documents are too few for a train / validation / "
                        "eval split", hint="use more text or smaller fractions")
    part = {i: "eval" for i in order[:n_eval]} | {i: "val" for i in order[n_eval:n_eval + n_val]}
    pick = {name: [d for i, d in enumerate(documents) if part.get(i, "train") == name]
            for name in ("train", "val", "eval")}
    return DocumentSplit(pick["train"], pick["val"], pick["eval"])
