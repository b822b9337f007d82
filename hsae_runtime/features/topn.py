"""Running top-N per group (e.g. per latent), merged batch by batch with whole-tensor ops.

:class:`GroupTopN` keeps, for each of ``n_groups`` groups, the ``size`` entries with the
largest integer scores seen so far and an int64 payload per entry (a token position). Scores
are non-negative and below 2³¹: a positive float32 activation's bit pattern (:func:`float_score`,
ordered like the floats) or a hash. A merge packs ``(group, score)`` into one int64 key, runs one
stable sort and a scatter, so no Python loop runs per entry or per group. Ties keep the entry
seen first, which makes the tables a pure function of the data and its order.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SCORE_BITS = 31
_SCORE_MAX = (1 << _SCORE_BITS) - 1


def float_score(values: Tensor) -> Tensor:
    """int64 scores of positive float32 ``values`` with the same order (their bit patterns)."""
    return values.float().view(torch.int32).to(torch.int64)


def score_float(scores: Tensor) -> Tensor:
    """The floats back from :func:`float_score` (missing entries, -1, become 0.0)."""
    return scores.clamp_min(0).to(torch.int32).view(torch.float32)


class GroupTopN:
    """Top-``size`` (score, payload) pairs per group; ``scores [n_groups, size]`` descending,
    -1 (and payload -1) where a group has fewer entries."""

    def __init__(self, n_groups: int, size: int) -> None:
        self.n_groups, self.size = n_groups, size
        self.scores = torch.full((n_groups, size), -1, dtype=torch.int64)
        self.payload = torch.full((n_groups, size), -1, dtype=torch.int64)

    def merge(self, group: Tensor, score: Tensor, payload: Tensor) -> None:
        """Offer candidates ``group [E]``, ``score [E]`` (int64 in [0, 2³¹)), ``payload [E]``."""
        better = score > self.scores[:, -1][group]  # only these can enter their group
        if not bool(better.any()):
            return
        group, score, payload = group[better], score[better], payload[better]
        flat_scores, flat_payload = self.scores.view(-1), self.payload.view(-1)
        old = (flat_scores >= 0).nonzero().squeeze(1)
        g = torch.cat([old // self.size, group])
        s = torch.cat([flat_scores[old], score])
        p = torch.cat([flat_payload[old], payload])
        # One key: group ascending, then score descending; stable keeps the first seen.
        order = torch.sort((g << (_SCORE_BITS + 1)) | (_SCORE_MAX - s), stable=True).indices
        g, s, p = g[order], s[order], p[order]
        counts = torch.bincount(g, minlength=self.n_groups)
        starts = counts.cumsum(0) - counts
        within = torch.arange(len(g)) - starts[g]
        keep = within < self.size
        slot = g[keep] * self.size + within[keep]
        flat_scores.fill_(-1)
        flat_payload.fill_(-1)
        flat_scores[slot] = s[keep]
        flat_payload[slot] = p[keep]

    def union(self, other: GroupTopN) -> GroupTopN:
        """A new table holding the top entries of both (``self``'s first on ties)."""
        out = GroupTopN(self.n_groups, self.size)
        for table in (self, other):
            keep = (table.scores >= 0).view(-1).nonzero().squeeze(1)
            out.merge(keep // table.size, table.scores.view(-1)[keep],
                      table.payload.view(-1)[keep])
        return out
