"""Short latent labels read from a features folder (``DIR/data/summary.json``); no torch.

``encode --features DIR`` and :meth:`hsae_runtime.client_results.EncodeResult.describe` use
them to show, next to each latent id, the tokens it fires on most (or, for a latent that never
fired in the cache, the tokens its decoder row promotes through the logit lens).
"""

from __future__ import annotations

import json
from pathlib import Path

from hsae_runtime.errors import DataError

SUMMARY = Path("data") / "summary.json"


def label_of(row: dict, n: int = 3) -> str:
    """``'tok1' | 'tok2' | ...``: top activating tokens, else top logit-lens tokens."""
    words = row.get("top_tokens") or row.get("lens_tokens") or []
    return " | ".join(repr(w) for w in words[:n])


def load_labels(folder: str | Path) -> dict[int, str]:
    """``{latent id: label}`` from a folder written by ``hsae-runtime features``."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        raise DataError(f"no latent summary at {path}",
                        hint="pass the --out folder of `hsae-runtime features`")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return {int(row["id"]): label_of(row) for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a latent summary ({err})",
                        hint="rebuild it with `hsae-runtime features`") from err
