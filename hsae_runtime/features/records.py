"""Per-latent records: the statistics, windows and lens of each latent as JSON-ready dicts.

One record per latent feeds both the web report and the exports, so they never disagree.
Floats are rounded (``ROUND`` digits) and keys sorted when written, so the same cache gives
byte-identical files; records hold token ids, and :func:`token_strings` maps the ids used to
their text once for all.

Record fields (``nb`` budgets, ``k`` the cached budget; lists per budget follow ``budgets``):
``id``; ``density``, ``mean``, ``max`` ``[nb]``; ``first_budget`` (0 = never fires);
``rank_hist [k]``; ``act_hist`` ``{"max", "counts" [nb][bins]}``; ``lens`` ``{"top",
"bottom": [[token_id, logit]...], "hist": {"edges", "counts"}}``; ``neighbours
[[latent, cosine]...]``; ``contexts`` (a pool of windows ``{"t": ids, "v": values, "r": ranks,
"at": slot}``, rank -1 where the latent is absent); ``top [nb][≤ top_n]`` and
``quantiles [{"lo", "hi", "share", "contexts"}]`` holding pool indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsae_runtime.features.cache import CodeCache
from hsae_runtime.features.contexts import windows
from hsae_runtime.features.lens import Lens
from hsae_runtime.features.stats import LatentStats

ROUND = 4


def _r(values: list[Any], digits: int = ROUND) -> list[Any]:
    return [_r(v, digits) if isinstance(v, list) else round(float(v), digits) for v in values]


def build_records(cache: CodeCache, stats: LatentStats, lens: Lens,
                  neighbours: tuple[Tensor, Tensor], *, before: int = 8, after: int = 3,
                  ) -> list[dict[str, Any]]:
    """One record per latent (see the module docstring), in latent order."""
    d_sae = stats.d_sae
    top_pos, sample_pos = stats.top_pos, stats.sample_pos  # (nb, d, n), (d, Q, S)
    n_pos = int(cache.manifest()["tokens"]) + 1
    lat_top = torch.arange(d_sae)[None, :, None].expand_as(top_pos)
    lat_smp = torch.arange(d_sae)[:, None, None].expand_as(sample_pos)
    lat_all = torch.cat([lat_top.flatten(), lat_smp.flatten()])
    pos_all = torch.cat([top_pos.flatten(), sample_pos.flatten()])
    ok = pos_all >= 0
    keys = torch.unique(lat_all[ok] * n_pos + pos_all[ok])  # sorted: by latent, then position
    win = windows(cache, keys // n_pos, keys % n_pos, before=before, after=after)
    pool_start = torch.searchsorted(keys, torch.arange(d_sae) * n_pos)  # (d_sae,)

    def pool_index(lat: Tensor, pos: Tensor) -> Tensor:
        idx = torch.searchsorted(keys, lat * n_pos + pos)
        return torch.where(pos >= 0, idx - pool_start[lat], -1)

    top_idx = pool_index(lat_top, top_pos).tolist()  # [nb][d][n]
    smp_idx = pool_index(lat_smp, sample_pos).tolist()  # [d][Q][S]
    ctx = [_window_dict(t, v, r, before) for t, v, r in
           zip(win.token_ids.tolist(), win.values.tolist(), win.ranks.tolist())]
    bounds = pool_start.tolist() + [len(keys)]

    density = stats.density().T.tolist()  # [d][nb]
    mean = stats.mean_activation().T.tolist()
    max_act = stats.max_activation().T.tolist()
    first = stats.first_budget().tolist()
    rank_hist = stats.rank_hist.tolist()
    act_hist = stats.act_hist.permute(1, 0, 2).tolist()  # [d][nb][bins]
    max_k = stats.rank_max.max(1).values.tolist()
    edges, shares = stats.quantile_edges.tolist(), stats.quantile_count.tolist()
    lens_lists = [x.tolist() for x in lens]
    nb_ids, nb_cos = neighbours[0].tolist(), neighbours[1].tolist()
    records = []
    for i in range(d_sae):
        fired = max(sum(shares[i]), 1)
        records.append({
            "id": i,
            "density": _r(density[i], 8),
            "mean": _r(mean[i]),
            "max": _r(max_act[i]),
            "first_budget": int(first[i]),
            "rank_hist": rank_hist[i],
            "act_hist": {"max": round(max_k[i], ROUND), "counts": act_hist[i]},
            "lens": {
                "top": [[t, round(v, ROUND)] for t, v in zip(lens_lists[0][i], lens_lists[1][i])],
                "bottom": [[t, round(v, ROUND)]
                           for t, v in zip(lens_lists[2][i], lens_lists[3][i])],
                "hist": {"counts": lens_lists[4][i], "edges": _r(lens_lists[5][i])},
            },
            "neighbours": [[j, round(c, ROUND)] for j, c in zip(nb_ids[i], nb_cos[i])],
            "contexts": ctx[bounds[i] : bounds[i + 1]],
            "top": [[j for j in per_budget[i] if j >= 0] for per_budget in top_idx],
            "quantiles": [
                {"lo": round(edges[i][q], ROUND), "hi": round(edges[i][q + 1], ROUND),
                 "share": round(shares[i][q] / fired, 6),
                 "contexts": [j for j in smp_idx[i][q] if j >= 0]}
                for q in range(len(shares[i]))
            ],
        })
    return records


def _window_dict(ids: list[int], values: list[float], ranks: list[int], before: int
                 ) -> dict[str, Any]:
    """A window with its missing slots (outside the context) trimmed."""
    keep = [j for j, t in enumerate(ids) if t >= 0]
    return {"t": [ids[j] for j in keep], "v": [round(values[j], ROUND) for j in keep],
            "r": [ranks[j] for j in keep], "at": keep.index(before)}


def token_strings(tokenizer: Any, ids: set[int]) -> dict[str, str]:
    """``{str(id): text}`` for the token ids used (JSON keys are strings)."""
    ordered = sorted(i for i in ids if i >= 0)
    texts = tokenizer.batch_decode([[i] for i in ordered], skip_special_tokens=False)
    return {str(i): t for i, t in zip(ordered, texts)}


def used_token_ids(records: list[dict[str, Any]]) -> set[int]:
    """Every token id a record mentions (windows and lens)."""
    ids: set[int] = set()
    for rec in records:
        for ctx in rec["contexts"]:
            ids.update(ctx["t"])
        ids.update(t for t, _ in rec["lens"]["top"])
        ids.update(t for t, _ in rec["lens"]["bottom"])
    return ids
