"""Token windows around cached positions, with one latent's value and rank at every token.

Given requests ``(latent [R], position [R])`` (positions index the cache's tokens in order),
:func:`windows` reads each shard once and returns, per request, the ``before`` tokens before
the position, the token itself and ``after`` tokens after it, all inside the same context
(a window never crosses into another context). At each window token it reports the latent's
cached value and rank (``-1`` where the latent is not in that token's code at k), so a viewer
can shade the window at any budget ``b`` by keeping ranks ``< b``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hsae_runtime.features.cache import CodeCache, Shard


class Windows(NamedTuple):
    """Per request ``R``, ``W = before + 1 + after`` slots; the requested token is at slot
    ``before``; slots outside its context have id -1, rank -1 and value 0."""

    token_ids: Tensor  # (R, W) int64
    values: Tensor  # (R, W) float32
    ranks: Tensor  # (R, W) int64


def windows(cache: CodeCache, latents: Tensor, positions: Tensor, *, before: int = 8,
            after: int = 3) -> Windows:
    """Windows for requests ``latents [R]``, ``positions [R]`` (int64); see the module doc."""
    r, w = len(positions), before + 1 + after
    out = Windows(torch.full((r, w), -1, dtype=torch.int64), torch.zeros(r, w),
                  torch.full((r, w), -1, dtype=torch.int64))
    base = 0
    for shard in cache.shards():
        n = len(shard.token_ids)
        mine = ((positions >= base) & (positions < base + n)).nonzero().squeeze(1)
        if len(mine):
            _fill(out, mine, latents[mine], positions[mine] - base, shard, before, after)
        base += n
    return out


def _fill(out: Windows, rows: Tensor, latent: Tensor, local: Tensor, shard: Shard,
          before: int, after: int) -> None:
    ctx = torch.searchsorted(shard.offsets, local, right=True) - 1
    start, end = shard.offsets[ctx], shard.offsets[ctx + 1]  # (r,)
    offs = torch.arange(-before, after + 1)
    q = local[:, None] + offs[None]  # (r, W) token positions in the shard
    valid = (q >= start[:, None]) & (q < end[:, None])
    qc = torch.minimum(torch.maximum(q, start[:, None]), end[:, None] - 1)
    match = shard.indices[qc] == latent[:, None, None]  # (r, W, k)
    present = match.any(-1) & valid
    rank = match.to(torch.int8).argmax(-1)  # (r, W): first slot holding the latent
    value = shard.values[qc].gather(-1, rank[..., None]).squeeze(-1)
    out.token_ids[rows] = torch.where(valid, shard.token_ids[qc], -1)
    out.values[rows] = torch.where(present, value, 0.0)
    out.ranks[rows] = torch.where(present, rank, -1)
