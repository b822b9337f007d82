"""Where the trainer's activations come from: the LM on live text, or a finished activation cache.

:func:`open_training_data` is the first step of :func:`~hsae_runtime.training.trainer.train`.
It splits off the validation documents (unless ``val_data`` names its own file), reuses a
complete activation cache whose key matches the run (same LM, hookpoint, data file and stamp,
context, block size and special-token rule) without loading the LM, and otherwise wraps the LM
in a :class:`~hsae_runtime.training.buffer.LMActivationSource` that fills the cache as it goes.
The LM is loaded at most once; under DDP rank 0 loads it first (building any GGUF cache) and
the other ranks then read what it wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hsae_runtime.errors import DataError
from hsae_runtime.lm import LoadedLM, load_lm, resolve_hookpoint
from hsae_runtime.training.buffer import (
    MANIFEST,
    ActivationCache,
    BlockSource,
    LMActivationSource,
    Timer,
    data_identity,
)
from hsae_runtime.training.config import TrainConfig
from hsae_runtime.training.validation import split_data, validation_activations

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The activations a run trains and validates on."""

    source: BlockSource
    """Blocks of training activations ``[n, d_in]`` in the run's pinned order."""
    d_in: int
    """Width of the activations."""
    val_acts: Tensor | None
    """``[n_val, d_in]`` raw validation activations (``None`` without validation)."""
    timer: Timer
    """Seconds spent in the LM (shared with the source)."""


def open_training_data(
    cfg: TrainConfig, *, rank: int, world: int, device: torch.device
) -> TrainingData:
    """The training source and validation activations of ``cfg`` (see the module docstring)."""
    timer = Timer()
    if cfg.val_data is not None:
        train_data, val_data = cfg.data, cfg.val_data
    else:
        train_data, val_data = split_data(cfg.data, cfg.val_fraction, cfg.seed)
    lm: LoadedLM | None = None

    def get_lm() -> LoadedLM:
        nonlocal lm
        if lm is None:
            if world > 1 and rank != 0:
                dist.barrier()  # rank 0 builds any GGUF cache first; the others then read it
            lm = load_lm(cfg.lm, dtype=cfg.lm_dtype, device=device)
            if world > 1 and rank == 0:
                dist.barrier()
        return lm

    cache = None
    if cfg.activation_cache is not None:
        stored = _read_manifest(Path(cfg.activation_cache))
        if stored is not None and _cache_matches(stored["key"], cfg, train_data):
            cache = ActivationCache(cfg.activation_cache, stored["key"], cfg.cache_dtype)
    if cache is None or not cache.complete:
        if not str(train_data).startswith("hf:") and not Path(train_data).expanduser().is_file():
            raise DataError(
                f"data file not found: {cfg.data}",
                hint="pass a .txt or .jsonl file, or hf:DATASET[:CONFIG][:SPLIT]",
            )
        loaded = get_lm()
        hp = resolve_hookpoint(loaded.model, cfg.hookpoint)
        lm_source = LMActivationSource(
            loaded, hp, train_data, context=cfg.context, block_contexts=cfg.block_contexts,
            lm_batch=cfg.lm_batch, include_special=cfg.include_special, timer=timer,
        )  # fmt: skip
        if cfg.activation_cache is not None:
            cache = ActivationCache(cfg.activation_cache, lm_source.key(), cfg.cache_dtype)
        source = BlockSource(lm_source, cache)
        d_in = loaded.d_model
    else:
        source = BlockSource(None, cache)
        d_in = int(next(cache.blocks(0))[1].shape[1])
        logger.info("training from the activation cache in %s", cfg.activation_cache)
    val_acts = None
    if val_data is not None:
        loaded = get_lm()
        val_acts = validation_activations(
            loaded, resolve_hookpoint(loaded.model, cfg.hookpoint), val_data,
            tokens=cfg.val_tokens, context=cfg.context, lm_batch=cfg.lm_batch,
            include_special=cfg.include_special, cache_dir=cfg.activation_cache,
        )  # fmt: skip
    return TrainingData(source, d_in, val_acts, timer)


def _cache_matches(key: dict[str, Any], cfg: TrainConfig, train_data: str) -> bool:
    data, stamp = data_identity(train_data)
    return (
        key.get("lm") == cfg.lm
        and key.get("hookpoint") == cfg.hookpoint
        and key.get("data") == data
        and key.get("data_stamp") == stamp
        and key.get("context") == cfg.context
        and key.get("block_contexts") == cfg.block_contexts
        and key.get("include_special") == cfg.include_special
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
