"""Activations in shuffled blocks: from a live LM (sharded over ranks) or an on-disk cache.

The unit of data is a **block**: ``block_contexts`` consecutive contexts (e.g. 256 × 128
tokens). The trainer shuffles each block's tokens with a generator seeded by
``(seed, epoch, block)`` and cuts it into batches, so tokens are mixed across many contexts
before they reach the SAE, and a position ``(epoch, block, batch)`` pins the data order exactly:
``--resume`` re-creates the current block and skips the batches already seen, and earlier
blocks are skipped by tokenising only (no LM work). Leftover tokens at the end of a block
(fewer than one batch) are dropped.

Under DDP each rank runs the LM on its share of a block's contexts (``i % world == rank``) and
the pieces are all-gathered in context order, so every rank holds the same block as a 1-rank
run would, and takes its slice of every batch: 2 ranks and 1 rank see the same data.

``ActivationCache`` writes the blocks as safetensors shards (``shard_00000.safetensors``) plus a
``manifest.json`` written last; a complete cache whose key matches is read instead of running
the LM, so several SAEs can be trained on the same activations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hsae_runtime.config import TORCH_DTYPES
from hsae_runtime.errors import DataError
from hsae_runtime.lm import Hookpoint, LoadedLM, capture, special_token_mask
from hsae_runtime.training.data import iter_contexts, read_documents
from hsae_runtime.training.distributed import rank_world

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def data_identity(data: str | Path) -> tuple[str, str]:
    """``(name, stamp)`` of a data source for cache keys.

    A local file is named by its absolute path, so the same file given relative to another
    working directory (or through ``--cache-dir`` from another run) still matches, and stamped
    with its size and mtime, so an edited file does not reuse stale activations. Other sources
    (``hf:...``) are named as given, with an empty stamp.
    """
    path = Path(data).expanduser()
    if not path.is_file():
        return str(data), ""
    stat = path.stat()
    return str(path.resolve()), f"{stat.st_size}:{int(stat.st_mtime)}"


@dataclass
class Timer:
    """Wall-clock seconds spent in the LM (capture) vs elsewhere; for the progress report."""

    lm_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class LMActivationSource:
    """Blocks of hookpoint activations ``[n, d_model]`` computed by a live LM."""

    def __init__(
        self,
        lm: LoadedLM,
        hookpoint: Hookpoint,
        data: str | Path,
        *,
        context: int,
        block_contexts: int,
        lm_batch: int,
        include_special: bool = False,
        timer: Timer | None = None,
    ) -> None:
        self.lm, self.hookpoint, self.data = lm, hookpoint, data
        self.context, self.block_contexts, self.lm_batch = context, block_contexts, lm_batch
        self.include_special = include_special
        self.timer = timer or Timer()

    def key(self) -> dict[str, Any]:
        """What the activations depend on (a cache built for another key is not reused)."""
        data, stamp = data_identity(self.data)
        return {
            "lm": self.lm.name,
            "hookpoint": self.hookpoint.name,
            "data": data,
            "data_stamp": stamp,
            "context": self.context,
            "block_contexts": self.block_contexts,
            "include_special": self.include_special,
        }

    def _context_blocks(self) -> Iterator[list[Tensor]]:
        block: list[Tensor] = []
        for ctx in iter_contexts(read_documents(self.data), self.lm.tokenizer, self.context):
            block.append(ctx)
            if len(block) == self.block_contexts:
                yield block
                block = []
        if block:
            yield block

    def blocks(self, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(block_index, acts [n, d_model])`` from block ``start`` on (float32, cpu)."""
        from tqdm.auto import tqdm

        rank, world = rank_world()
        # The LM is the slow part of a cold start: show contexts done and their rate.
        bar = tqdm(unit="ctx", desc=f"LM -> {self.hookpoint.name}", disable=rank != 0,
                   mininterval=2.0, leave=False)
        try:
            yield from self._blocks(start, rank, world, bar)
        finally:
            bar.close()

    def _blocks(self, start: int, rank: int, world: int, bar: Any) -> Iterator[tuple[int, Tensor]]:
        for index, contexts in enumerate(self._context_blocks()):
            if index < start:
                continue
            mine = contexts[rank::world]
            pieces = []
            for i in range(0, len(mine), self.lm_batch):
                pieces.append(self._run(torch.stack(mine[i : i + self.lm_batch])))
                bar.update(len(mine[i : i + self.lm_batch]) * world)
            # per context, in the order this rank holds them: (T_kept, d)
            local = [p for batch in pieces for p in batch]
            if world > 1:
                local = _gather_contexts(local, len(contexts), world, self.lm.d_model)
            yield index, torch.cat(local) if local else torch.empty(0, self.lm.d_model)

    def _run(self, ids: Tensor) -> list[Tensor]:
        t0 = time.perf_counter()
        acts = capture(self.lm, self.hookpoint, ids)  # (B, T, d)
        acts = acts.float().cpu()
        self.timer.lm_s += time.perf_counter() - t0
        if self.include_special:
            return list(acts)
        keep = ~special_token_mask(self.lm.tokenizer, ids)  # (B, T)
        return [a[m] for a, m in zip(acts, keep)]


def _gather_contexts(local: list[Tensor], n_contexts: int, world: int, d: int) -> list[Tensor]:
    """All-gather per-context activations so every rank holds them in global context order."""
    lengths = torch.tensor([len(t) for t in local], dtype=torch.int64)
    counts = [len(range(r, n_contexts, world)) for r in range(world)]
    max_ctx = max(counts)
    padded_len = torch.zeros(max_ctx, dtype=torch.int64)
    padded_len[: len(lengths)] = lengths
    all_len = [torch.zeros(max_ctx, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(all_len, padded_len)
    flat = torch.cat(local) if local else torch.empty(0, d)
    max_tok = max(int(x.sum()) for x in all_len)
    buf = torch.zeros(max_tok, d)
    buf[: len(flat)] = flat
    all_buf = [torch.zeros(max_tok, d) for _ in range(world)]
    dist.all_gather(all_buf, buf)
    per_rank = [
        list(torch.split(all_buf[r][: int(all_len[r].sum())], all_len[r][: counts[r]].tolist()))
        for r in range(world)
    ]
    return [per_rank[i % world][i // world] for i in range(n_contexts)]


class ActivationCache:
    """A folder of activation shards (one per block) with a manifest."""

    def __init__(self, folder: str | Path, key: dict[str, Any], dtype: str = "bfloat16") -> None:
        self.folder = Path(folder)
        self.key = key
        self.dtype = TORCH_DTYPES[dtype]
        self.digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def manifest(self) -> dict[str, Any] | None:
        path = self.folder / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("digest") == self.digest else None

    @property
    def complete(self) -> bool:
        return self.manifest() is not None

    def shard(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.safetensors"

    def write_block(self, index: int, acts: Tensor) -> None:
        from hsae_runtime.format import atomic_save_tensors

        atomic_save_tensors({"acts": acts.to(self.dtype)}, self.shard(index),
                            {"digest": self.digest})

    def finish(self, n_blocks: int, n_tokens: int) -> None:
        manifest = {"digest": self.digest, "key": self.key, "blocks": n_blocks,
                    "tokens": n_tokens, "dtype": str(self.dtype).removeprefix("torch.")}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.folder / MANIFEST)

    def blocks(self, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        from safetensors.torch import load_file

        manifest = self.manifest()
        assert manifest is not None, "reading an incomplete cache"
        for index in range(start, int(manifest["blocks"])):
            yield index, load_file(self.shard(index))["acts"].float()


class BlockSource:
    """One place for the trainer to get blocks: the cache when complete, else the LM."""

    def __init__(self, lm_source: LMActivationSource | None, cache: ActivationCache | None):
        if lm_source is None and (cache is None or not cache.complete):
            raise DataError("no activations: the cache is incomplete and no LM was given")
        self.lm_source, self.cache = lm_source, cache

    def blocks(self, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        if self.cache is not None and self.cache.complete:
            yield from self.cache.blocks(start)
            return
        assert self.lm_source is not None
        rank, _ = rank_world()
        # A cache is only written by a pass that sees every block from the start.
        writing = self.cache is not None and start == 0
        if writing:
            assert self.cache is not None
            self.cache.folder.mkdir(parents=True, exist_ok=True)
        n_blocks = n_tokens = 0
        for index, acts in self.lm_source.blocks(start):
            if writing and rank == 0:
                assert self.cache is not None
                self.cache.write_block(index, acts)
            n_blocks, n_tokens = index + 1, n_tokens + len(acts)
            yield index, acts
        if writing and rank == 0:
            assert self.cache is not None
            self.cache.finish(n_blocks, n_tokens)
            logger.info("activation cache complete: %d blocks, %d tokens in %s",
                        n_blocks, n_tokens, self.cache.folder)
        if writing and rank_world()[1] > 1:
            dist.barrier()  # every rank must see the manifest before the next pass looks for it
