"""What the Python client returns: :class:`ServerInfo`, :class:`EncodeResult` (with its
nested-prefix :meth:`~EncodeResult.codes`), :class:`GeneratedToken`, their conversion from the
server's protobuf replies, and :func:`format_table` for printing an encode result.

Arrays are numpy; ``N`` = code rows (tokens), ``k`` = largest budget. The numpy <-> wire dtype
map (:data:`NP_TO_WIRE`) lives here and is shared with the request side in
:mod:`hsae_runtime.client`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from hsae_runtime.errors import InputError
from hsae_runtime.serving.stubs import load as load_stubs

pb, _ = load_stubs()

NP_TO_WIRE = {
    np.dtype(np.float32): pb.DTYPE_FLOAT32,
    np.dtype(np.float16): pb.DTYPE_FLOAT16,
    np.dtype(np.int32): pb.DTYPE_INT32,
}
WIRE_TO_NP = {v: k for k, v in NP_TO_WIRE.items()}


@dataclass(frozen=True)
class ServerInfo:
    """What :meth:`Client.info` reports."""

    lm_name: str
    hookpoint: str
    d_in: int
    d_sae: int
    k_max: int
    trained_budgets: tuple[int, ...]
    dtype: str
    server_version: str
    has_lm: bool
    max_request_tokens: int
    max_message_bytes: int
    backend: str
    device: str


class LatentLabel(NamedTuple):
    """One kept latent of a token: its id, value and label (see :meth:`EncodeResult.describe`)."""

    latent: int
    value: float
    label: str


@dataclass
class EncodeResult:
    """One encoded input. Arrays are numpy; ``N`` = code rows (tokens), ``k`` = largest budget.

    For activation inputs the leading dims of the request are kept (``[..., k]``).
    """

    k: int
    values: np.ndarray
    """``[N, k]`` float32/float16, descending along the last axis."""
    indices: np.ndarray
    """``[N, k]`` int32 latent ids."""
    budgets: list[int]
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """``[N]`` ids of the encoded tokens (text / token inputs)."""
    tokens: list[str] = field(default_factory=list)
    """``N`` token strings (text / token inputs)."""
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """``[N]`` positions in the tokenised input (special tokens may be skipped)."""
    reconstructions: dict[int, np.ndarray] = field(default_factory=dict)
    """budget -> ``[N, d_in]`` (when asked)."""
    fvu: dict[int, np.ndarray] = field(default_factory=dict)
    """budget -> ``[N]`` per-token FVU (when asked)."""
    request_id: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    """latent id -> short label, from a features folder (``Client(features=DIR)``)."""

    def codes(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values, indices)`` at budget ``k`` (a prefix of the returned code), ``[N, k]``."""
        if not 1 <= k <= self.k:
            raise InputError(
                f"budget {k} is not in 1..{self.k} (the code was returned at k={self.k})"
            )
        return self.values[..., :k], self.indices[..., :k]

    def describe(self, k: int) -> list[list[LatentLabel]]:
        """Per code row (token), the latents kept at budget ``k`` (positive values, in code
        order) with their labels (empty strings without a features folder)."""
        values, indices = self.codes(k)
        rows = zip(values.reshape(-1, k).tolist(), indices.reshape(-1, k).tolist())
        return [[LatentLabel(i, v, self.labels.get(i, "")) for v, i in zip(vals, ids) if v > 0]
                for vals, ids in rows]


def array_from_pb(msg: Any) -> np.ndarray:
    if msg.dtype not in WIRE_TO_NP:
        raise ValueError(f"unexpected tensor dtype {msg.dtype} from the server")
    return np.frombuffer(msg.data, dtype=WIRE_TO_NP[msg.dtype]).reshape(tuple(msg.shape))


def result_from_pb(resp: Any, budgets: Sequence[int],
                   labels: dict[int, str] | None = None) -> EncodeResult:
    res = EncodeResult(
        labels=labels or {},
        k=resp.k,
        values=array_from_pb(resp.values),
        indices=array_from_pb(resp.indices),
        budgets=list(budgets),
        token_ids=np.asarray(resp.token_ids, dtype=np.int32),
        tokens=list(resp.tokens),
        positions=np.asarray(resp.positions, dtype=np.int32),
        request_id=resp.request_id,
    )
    for item in resp.budgets:
        if item.HasField("reconstruction"):
            res.reconstructions[item.budget] = array_from_pb(item.reconstruction)
        if item.HasField("fvu"):
            res.fvu[item.budget] = array_from_pb(item.fvu)
    return res


@dataclass
class GeneratedToken:
    """One token of :meth:`Client.generate` (``top``: ``(token_id, token, logprob)`` triples)."""

    index: int
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]
    unsteered_logprob: float | None
    top_unsteered: list[tuple[int, str, float]]
    indices: np.ndarray | None
    """``[k']`` int32: the steered code at the position that produced the token (if asked)."""
    values: np.ndarray | None
    finish_reason: str
    """Set on the last token: ``length``, ``stop`` or ``eos``."""
    text: str
    """Set on the last token: the whole generated text."""

    @classmethod
    def from_pb(cls, msg: Any) -> GeneratedToken:
        def tops(items: Any) -> list[tuple[int, str, float]]:
            return [(t.token_id, t.token, t.logprob) for t in items]

        code = msg.HasField("indices")
        return cls(
            index=msg.index,
            token_id=msg.token_id,
            token=msg.token,
            logprob=msg.logprob,
            top=tops(msg.top),
            unsteered_logprob=msg.unsteered_logprob if msg.HasField("unsteered_logprob") else None,
            top_unsteered=tops(msg.top_unsteered),
            indices=array_from_pb(msg.indices) if code else None,
            values=array_from_pb(msg.values) if code else None,
            finish_reason=msg.finish_reason,
            text=msg.text,
        )


def format_table(result: EncodeResult, top: int = 8) -> str:
    """A readable table of ``result``: one line per token, FVU per budget, top latents.

    Codes are nested, so one latent list serves every budget; ``|`` marks where each requested
    budget ends inside the shown prefix.
    """
    rows = result.values.reshape(-1, result.k)
    idx = result.indices.reshape(-1, result.k)
    n = rows.shape[0]
    labels = [repr(t) for t in result.tokens] if result.tokens else [f"row {i}" for i in range(n)]
    width = min(max([len(s) for s in labels] + [5]), 24)
    budgets = sorted(set(result.budgets))
    fvu_budgets = [b for b in budgets if b in result.fvu]
    shown = min(top, result.k)
    header = f"{'token':<{width}}  " + "".join(f"{'fvu@' + str(b):>9}" for b in fvu_budgets)
    header += f"  top {shown} latents (id:value), budgets {','.join(map(str, budgets))} nested"
    lines = [header, "-" * len(header)]
    for i in range(n):
        label = labels[i] if len(labels[i]) <= width else labels[i][: width - 1] + "…"
        line = f"{label:<{width}}  "
        line += "".join(f"{float(result.fvu[b].reshape(-1)[i]):>9.3f}" for b in fvu_budgets)
        parts = []
        for j in range(shown):
            if idx[i, j] < 0:
                break
            name = result.labels.get(int(idx[i, j]))
            entry = f"{int(idx[i, j])}:{float(rows[i, j]):.2f}"
            parts.append(f"{entry}[{name}]" if name else entry)
            if j + 1 in budgets and j + 1 < shown:
                parts.append("|")
        lines.append(line + "  " + " ".join(parts))
    return "\n".join(lines)
