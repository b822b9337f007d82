"""Per-latent statistics at every budget, from the code cache alone (no LM forward).

Every statistic is accumulated at the cached ``k = k_max`` **per rank** (the position of the
latent in a token's sorted code) and read at budget ``b`` as a prefix over ranks ``< b``: a
latent fires at budget ``b`` exactly when it sits at rank ``< b`` with a positive value. So one
scan serves all budgets:

* ``rank_hist [d_sae, k]`` — firing count per rank (its prefix sum is the firing count at b);
* ``density`` = firing count / counted tokens; ``mean`` = value sum / firing count; ``max``;
* ``first_budget`` — the smallest budget at which the latent fires at all;
* top-N activating tokens per budget (:class:`~hsae_runtime.features.topn.GroupTopN` over the
  entries of rank ``< b``), ties going to the earlier token;
* activation histograms per budget (equal-width bins of ``[0, max at k]``) and, at ``k``,
  ``n_quantiles`` activation quantiles with a few sampled tokens from each (chosen by a fixed
  hash of (token, latent), so runs agree).

Three scans of the cache: (1) counts, sums, maxima, top-N; (2) histograms (need the max);
(3) quantile samples (need the histogram). Each is whole-tensor work per shard (``nonzero``,
``bincount``, ``scatter_reduce``, two stable sorts) with no Python loop over tokens; only BOS /
EOS / pad tokens are skipped (``counted`` in the cache).

Shapes: ``d_sae`` latents, ``k`` the cached budget, ``n_budgets``, ``N`` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hsae_runtime.errors import ConfigError
from hsae_runtime.features.cache import CodeCache, Shard
from hsae_runtime.features.topn import GroupTopN, float_score, score_float

logger = logging.getLogger(__name__)


def default_budgets(k_max: int) -> tuple[int, ...]:
    """Powers of two up to ``k_max``, and ``k_max`` itself."""
    out = {1 << i for i in range(k_max.bit_length()) if (1 << i) <= k_max} | {k_max}
    return tuple(sorted(out))


def model_budgets(trained: tuple[int, ...], k_max: int) -> tuple[int, ...]:
    """The budgets a report shows: the model's own, or powers of two when it lists every k."""
    if tuple(trained) == tuple(range(1, k_max + 1)):
        return default_budgets(k_max)
    return tuple(sorted(set(trained)))


@dataclass(frozen=True)
class StatsSpec:
    """What to compute beyond counts."""

    budgets: tuple[int, ...]
    """Budgets to report (each in 1..k of the cache)."""
    top_n: int = 10
    """Top activating tokens kept per latent and budget."""
    n_quantiles: int = 4
    """Activation quantile intervals (at k) to sample tokens from."""
    per_quantile: int = 2
    """Tokens sampled per quantile interval."""
    hist_bins: int = 32
    """Equal-width activation histogram bins per latent (exports, quantile edges)."""

    def __post_init__(self) -> None:
        if not self.budgets or any(isinstance(b, bool) or b < 1 for b in self.budgets):
            raise ConfigError(f"StatsSpec.budgets must be positive ints, got {self.budgets!r}")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ConfigError("StatsSpec.budgets must be sorted and distinct",
                              hint=f"e.g. {sorted(set(self.budgets))}")
        for name in ("top_n", "n_quantiles", "per_quantile", "hist_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"StatsSpec.{name} must be at least 1")


@dataclass
class LatentStats:
    """Everything one scan of the cache yields. Positions index the cache's tokens in order."""

    budgets: list[int]
    n_tokens: int
    """Counted tokens (special tokens excluded)."""
    rank_hist: Tensor  # (d_sae, k) int64
    rank_value_sum: Tensor  # (d_sae, k) float64
    rank_max: Tensor  # (d_sae, k) float32, 0 where the rank never fired
    top_values: Tensor  # (n_budgets, d_sae, top_n) float64, -inf where missing
    top_pos: Tensor  # (n_budgets, d_sae, top_n) int64, -1 where missing
    act_hist: Tensor  # (n_budgets, d_sae, hist_bins) int64, bins of [0, max at k]
    quantile_edges: Tensor  # (d_sae, n_quantiles + 1) float64, at k
    quantile_count: Tensor  # (d_sae, n_quantiles) int64, at k
    sample_pos: Tensor  # (d_sae, n_quantiles, per_quantile) int64, -1 where missing

    @property
    def d_sae(self) -> int:
        return int(self.rank_hist.shape[0])

    def _at_budgets(self, per_rank: Tensor) -> Tensor:
        return per_rank[:, torch.tensor(self.budgets) - 1].T  # (n_budgets, d_sae)

    def fires(self) -> Tensor:
        """Firing counts ``[n_budgets, d_sae]``."""
        return self._at_budgets(self.rank_hist.cumsum(1))

    def density(self) -> Tensor:
        """Firing fractions of counted tokens ``[n_budgets, d_sae]``."""
        return self.fires().double() / max(self.n_tokens, 1)

    def mean_activation(self) -> Tensor:
        """Mean value where the latent fires ``[n_budgets, d_sae]`` (0 where it never does)."""
        fires = self.fires().double()
        return self._at_budgets(self.rank_value_sum.cumsum(1)) / fires.clamp_min(1)

    def max_activation(self) -> Tensor:
        """Largest value ``[n_budgets, d_sae]`` (0 where it never fires)."""
        return self._at_budgets(self.rank_max.cummax(1).values)

    def first_budget(self) -> Tensor:
        """``[d_sae]``: the smallest budget at which the latent fires; 0 if none does."""
        fired = self.fires() > 0  # (n_budgets, d_sae)
        budgets = torch.tensor(self.budgets)[:, None].expand_as(fired)
        big = max(self.budgets) + 1
        first = torch.where(fired, budgets, big).min(0).values
        return torch.where(first == big, 0, first)


def _entries(shard: Shard, base: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Firing entries of counted tokens: ``latent, rank, value, position``, each ``[E]``."""
    fire = (shard.values > 0) & shard.counted[:, None]  # (N, k)
    rows, ranks = fire.nonzero(as_tuple=True)
    return shard.indices[rows, ranks], ranks, shard.values[rows, ranks], rows + base


def _scan(cache: CodeCache, desc: str, progress: bool) -> Iterator[tuple[Shard, int]]:
    """Each shard with the position of its first token, under a progress bar."""
    from tqdm.auto import tqdm

    manifest = cache.manifest()
    base = 0
    with tqdm(total=int(manifest["tokens"]), unit="tok", unit_scale=True, desc=desc,
              disable=not progress) as bar:
        for shard in cache.shards():
            yield shard, base
            base += len(shard.token_ids)
            bar.update(len(shard.token_ids))


def _hash(pos: Tensor, latent: Tensor) -> Tensor:
    """A fixed pseudo-random key in [0, 2³¹) per (token, latent): Lehmer steps of both ids."""
    modulus = 2147483647
    h = (pos * 48271 + latent * 40503 + 12345) % modulus
    return (h * 48271) % modulus


def compute_stats(cache: CodeCache, spec: StatsSpec, *, progress: bool = True) -> LatentStats:
    """Scan the code cache three times (see the module docstring) and return the statistics."""
    manifest = cache.manifest()
    d_sae, k = int(manifest["d_sae"]), int(manifest["k"])
    if max(spec.budgets) > k:
        raise ConfigError(f"budget {max(spec.budgets)} exceeds the cached k={k}",
                          hint=f"ask for budgets in 1..{k}")
    budgets = torch.tensor(spec.budgets)
    nb, width = len(spec.budgets), d_sae * k
    rank_hist = torch.zeros(width, dtype=torch.int64)
    value_sum = torch.zeros(width, dtype=torch.float64)
    rank_max = torch.zeros(width, dtype=torch.float32)
    # Top-N per (rank segment, latent); segment s holds ranks in (budgets[s-1], budgets[s]].
    seg_tops = GroupTopN(nb * d_sae, spec.top_n)
    n_tokens = 0
    for shard, base in _scan(cache, "features: stats 1/3", progress):
        n_tokens += int(shard.counted.sum())
        lat, rank, val, pos = _entries(shard, base)
        flat = lat * k + rank
        rank_hist += torch.bincount(flat, minlength=width)
        value_sum += torch.bincount(flat, weights=val.double(), minlength=width)
        rank_max.scatter_reduce_(0, flat, val, reduce="amax")
        seg = torch.searchsorted(budgets, rank + 1)
        inside = seg < nb
        seg_tops.merge((seg * d_sae + lat)[inside], float_score(val[inside]), pos[inside])
    top_values, top_pos = _cumulative_tops(seg_tops, nb, d_sae, spec.top_n)
    rank_max = rank_max.view(d_sae, k)
    max_k = rank_max.max(1).values.double()  # (d_sae,)

    # Histograms: segment s holds ranks in (budgets[s-1], budgets[s]]; segment nb the rest up
    # to k. A cumulative sum over segments turns them into histograms at each budget.
    h = spec.hist_bins
    hist = torch.zeros((nb + 1) * d_sae * h, dtype=torch.int64)
    for shard, base in _scan(cache, "features: stats 2/3", progress):
        lat, rank, val, _ = _entries(shard, base)
        seg = torch.searchsorted(budgets, rank + 1)
        hbin = (val.double() / max_k[lat].clamp_min(1e-12) * h).long().clamp(0, h - 1)
        hist += torch.bincount((seg * d_sae + lat) * h + hbin, minlength=len(hist))
    hist = hist.view(nb + 1, d_sae, h).cumsum(0)
    edges = _quantile_edges(hist[nb], max_k, spec.n_quantiles)  # (d_sae, Q + 1)

    q = spec.n_quantiles
    counts = torch.zeros(d_sae * q, dtype=torch.int64)
    samples = GroupTopN(d_sae * q, spec.per_quantile)
    inner = edges[:, 1:-1].float()  # (d_sae, q - 1)
    for shard, base in _scan(cache, "features: stats 3/3", progress):
        lat, _, val, pos = _entries(shard, base)
        qbin = (val[:, None] > inner[lat]).sum(1)  # the interval (lo, hi] holding val
        group = lat * q + qbin
        counts += torch.bincount(group, minlength=len(counts))
        samples.merge(group, _hash(pos, lat), pos)
    return LatentStats(
        budgets=list(spec.budgets),
        n_tokens=n_tokens,
        rank_hist=rank_hist.view(d_sae, k),
        rank_value_sum=value_sum.view(d_sae, k),
        rank_max=rank_max,
        top_values=top_values,
        top_pos=top_pos,
        act_hist=hist[:nb],
        quantile_edges=edges,
        quantile_count=counts.view(d_sae, q),
        sample_pos=samples.payload.view(d_sae, q, spec.per_quantile),
    )


def _cumulative_tops(seg_tops: GroupTopN, nb: int, d_sae: int, n: int) -> tuple[Tensor, Tensor]:
    """Per budget, the top-N of the rank segments up to it: ``values`` (float64, -inf where
    missing) and ``positions`` ``[n_budgets, d_sae, n]``."""
    scores = seg_tops.scores.view(nb, d_sae, n)
    payload = seg_tops.payload.view(nb, d_sae, n)
    acc = GroupTopN(d_sae, n)
    out_scores, out_pos = [], []
    for s in range(nb):
        part = GroupTopN(d_sae, n)
        part.scores, part.payload = scores[s].clone(), payload[s].clone()
        acc = acc.union(part)
        out_scores.append(acc.scores)
        out_pos.append(acc.payload)
    sc = torch.stack(out_scores)
    values = torch.where(sc >= 0, score_float(sc).double(), float("-inf"))
    return values, torch.stack(out_pos)


def _quantile_edges(hist: Tensor, max_k: Tensor, n: int) -> Tensor:
    """``[d_sae, n + 1]`` edges ``0 < e_1 ≤ ... ≤ max`` splitting each latent's firing values
    into ``n`` roughly equal parts, read off its histogram ``[d_sae, H]`` (bin resolution)."""
    d_sae, h = hist.shape
    cdf = hist.cumsum(1).double() / hist.sum(1, keepdim=True).clamp_min(1).double()
    levels = (torch.arange(1, n, dtype=torch.float64) / n).expand(d_sae, n - 1).contiguous()
    idx = torch.searchsorted(cdf.contiguous(), levels).clamp_max(h - 1)  # (d_sae, n - 1)
    inner = (idx + 1).double() * max_k[:, None] / h
    zero = torch.zeros(d_sae, 1, dtype=torch.float64)
    return torch.cat([zero, torch.minimum(inner, max_k[:, None]), max_k[:, None]], dim=1)


def summary_dict(stats: LatentStats) -> dict[str, Any]:
    """Corpus-level numbers (JSON-ready): tokens, and per budget the mean L0 and dead share."""
    fires = stats.fires()
    return {
        "tokens": stats.n_tokens,
        "budgets": stats.budgets,
        "l0": [round(float(f.sum()) / max(stats.n_tokens, 1), 4) for f in fires],
        "dead_fraction": [round(float((f == 0).double().mean()), 6) for f in fires],
    }
