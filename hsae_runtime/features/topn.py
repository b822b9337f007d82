"""Running top-N per group (e.g. per latent), merged batch by batch with whole-tensor ops.

:class:`GroupTopN` keeps, for each of ``n_groups`` groups, the ``size`` entries with the
largest keys seen so far and an int64 payload per entry (a token position). A merge is two
stable sorts of the candidates (key descending, then group) and a scatter, so no Python loop
runs per entry or per group. Ties keep the entry seen first, which makes the tables a pure
function of the data and its order (two runs give identical tables).
"""

from __future__ import annotations

import torch
from torch import Tensor


class GroupTopN:
    """Top-``size`` (key, payload) pairs per group; ``keys [n_groups, size]`` descending."""

    def __init__(self, n_groups: int, size: int) -> None:
        self.n_groups, self.size = n_groups, size
        self.keys = torch.full((n_groups, size), float("-inf"), dtype=torch.float64)
        self.payload = torch.full((n_groups, size), -1, dtype=torch.int64)

    def merge(self, group: Tensor, key: Tensor, payload: Tensor) -> None:
        """Offer candidates ``group [E]`` (int64), ``key [E]`` and ``payload [E]`` (int64)."""
        key = key.to(torch.float64)
        # Only candidates that beat their group's current last entry can enter.
        better = key > self.keys[group, -1]
        if not bool(better.any()):
            return
        group, key, payload = group[better], key[better], payload[better]
        old = self.keys.flatten() > float("-inf")
        old_group = torch.arange(self.n_groups).repeat_interleave(self.size)[old]
        g = torch.cat([old_group, group])
        k = torch.cat([self.keys.flatten()[old], key])
        p = torch.cat([self.payload.flatten()[old], payload])
        order = torch.argsort(k, descending=True, stable=True)
        order = order[torch.argsort(g[order], stable=True)]
        g, k, p = g[order], k[order], p[order]
        counts = torch.bincount(g, minlength=self.n_groups)
        starts = counts.cumsum(0) - counts
        within = torch.arange(len(g)) - starts[g]
        keep = within < self.size
        self.keys.fill_(float("-inf"))
        self.payload.fill_(-1)
        self.keys[g[keep], within[keep]] = k[keep]
        self.payload[g[keep], within[keep]] = p[keep]
