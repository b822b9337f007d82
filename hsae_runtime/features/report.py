"""The offline web report: ``DIR/index.html`` plus the JSON it reads, all inside ``DIR``.

Files written (every path relative, no CDN, no network; open it over HTTP, e.g.
``python -m http.server`` in ``DIR``, since browsers block ``fetch`` on ``file://``):

* ``index.html``, ``assets/app.js``, ``assets/app.css`` — copied from this package;
* ``data/meta.json`` — the SAE, LM, hookpoint, data names, budgets, corpus summary;
* ``data/summary.json`` — one table row per latent (density per budget, first budget, max,
  top activating tokens, top logit-lens tokens) for the sortable, searchable table;
* ``data/latents/NNNN.json`` — the full records (:mod:`hsae_runtime.features.records`) of
  ``CHUNK`` latents each, fetched when a latent is opened;
* ``data/tokens.json`` — text of every token id the records and examples use;
* ``data/examples.json`` — a few cached texts with their full codes at k, for the budget slider.

JSON is written with sorted keys and no timestamps or machine paths, so two runs on the same
cache write identical files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from hsae_runtime.features.cache import CodeCache

CHUNK = 256
ASSETS = ("app.js", "app.css")
DATA = "data"


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON: sorted keys, compact separators, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                    + "\n", encoding="utf-8")


def summary_rows(records: list[dict[str, Any]], strings: dict[str, str],
                 n: int = 3) -> list[dict[str, Any]]:
    """Table rows: ``id, density [nb], first_budget, max, top_tokens, lens_tokens``."""
    rows = []
    for rec in records:
        best: list[str] = []
        last = rec["top"][-1] if rec["top"] else []
        for j in last:
            ctx = rec["contexts"][j]
            word = strings.get(str(ctx["t"][ctx["at"]]), "")
            if word not in best:
                best.append(word)
            if len(best) == n:
                break
        rows.append({
            "id": rec["id"], "density": rec["density"], "first_budget": rec["first_budget"],
            "max": rec["act_hist"]["max"], "top_tokens": best,
            "lens_tokens": [strings.get(str(t), "") for t, _ in rec["lens"]["top"][:n]],
        })
    return rows


def examples(cache: CodeCache, n_texts: int = 6, n_tokens: int = 48) -> list[dict[str, Any]]:
    """The first cached contexts (``n_tokens`` each) with their codes at k, for the slider:
    ``{"t": ids [T], "i": latent ids [T][k], "v": values [T][k]}``."""
    out: list[dict[str, Any]] = []
    for shard in cache.shards():
        offsets = shard.offsets.tolist()
        for c in range(len(offsets) - 1):
            lo, hi = offsets[c], min(offsets[c + 1], offsets[c] + n_tokens)
            out.append({"t": shard.token_ids[lo:hi].tolist(),
                        "i": shard.indices[lo:hi].tolist(),
                        "v": [[round(v, 3) for v in row] for row in shard.values[lo:hi].tolist()]})
            if len(out) == n_texts:
                return out
    return out


def write_report(out: Path, meta: dict[str, Any], records: list[dict[str, Any]],
                 strings: dict[str, str], example_texts: list[dict[str, Any]]) -> Path:
    """Write the report into ``out`` (see the module docstring); returns ``out/index.html``."""
    data = out / DATA
    rows = summary_rows(records, strings)
    write_json(data / "meta.json", {**meta, "chunk": CHUNK})
    write_json(data / "summary.json", rows)
    write_json(data / "tokens.json", strings)
    write_json(data / "examples.json", example_texts)
    for start in range(0, len(records), CHUNK):
        write_json(data / "latents" / f"{start // CHUNK:04d}.json", records[start : start + CHUNK])
    assets = resources.files("hsae_runtime.features") / "assets"
    (out / "assets").mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        (out / "assets" / name).write_text((assets / name).read_text(encoding="utf-8"),
                                           encoding="utf-8")
    index = out / "index.html"
    index.write_text((assets / "index.html").read_text(encoding="utf-8"), encoding="utf-8")
    return index
