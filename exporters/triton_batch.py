"""One Triton Python-backend batch through the torch SAE: requests in, per-request outputs out.

Triton's dynamic batcher hands the Python backend a *list* of requests; it does not concatenate
them. :func:`run_batch` validates each request on its own (a bad one gets its own error and
never fails its neighbours), concatenates the good ones, runs **one** encode for all their rows
and splits the outputs back. It is plain torch, so it is tested in-process; the backend's
``model.py`` (:mod:`hsae_runtime.exporters.triton_model`) only moves tensors in and out.

Per request (``n`` rows; Triton's batch dimension first)::

    x        [n, d_in]     float32 / float16 / bfloat16 (the wire dtype), finite
    k        [n, 1] int64  each row's budget, 1..k_max
    budgets  [n, n_budgets] int64, optional, n_budgets <= MAX_BUDGETS: each row's fixed budgets
                           for ``reconstructions`` (independent of k, as in the ONNX graph)

    values          [n, k_max]             wire dtype, sorted descending; 0 at positions >= k
    indices         [n, k_max] int64       latent ids; -1 at positions >= k
    reconstruction  [n, d_in]              wire dtype: b_dec + the row's first k entries
    reconstructions [n, n_budgets, d_in]   wire dtype: one per budget column (only with budgets)

The masking is the ONNX graph's (:mod:`hsae_runtime.exporters.onnx`): exact because a
HierarchicalTopK code at budget k is the first k entries of the code at any larger budget. Only
the outputs a request asks for are computed; every reconstruction decodes the one shared code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hsae_runtime.errors import HSAEError, InputError
from hsae_runtime.sae import SAE, SparseCode

MAX_BUDGETS = 8
"""Most reconstruction budgets one row may ask for (columns of ``budgets``)."""

OUTPUT_NAMES = ("values", "indices", "reconstruction", "reconstructions")


@dataclass
class BatchRequest:
    """One Triton request's inputs as CPU tensors (shapes in the module docstring)."""

    x: Tensor
    k: Tensor
    budgets: Tensor | None = None
    outputs: frozenset[str] = field(default_factory=lambda: frozenset(OUTPUT_NAMES))


def check_request(sae: SAE, req: BatchRequest) -> None:
    """Raise :class:`InputError` unless ``req`` is a well-formed request for ``sae``."""
    cfg = sae.config
    if req.x.ndim != 2:
        raise InputError(f"x must have shape [n, d_in={cfg.d_in}], got {tuple(req.x.shape)}")
    sae.check_input(req.x)  # width, dtype, NaN/Inf: the SAE's own messages
    n = req.x.shape[0]
    if req.k.is_floating_point() or req.k.numel() != n:
        raise InputError(f"k must be an integer tensor [n={n}, 1], got {tuple(req.k.shape)}"
                         f" {req.k.dtype}")
    sae.check_budgets(sorted(set(req.k.reshape(-1).tolist())))
    unknown = req.outputs - set(OUTPUT_NAMES)
    if unknown:
        raise InputError(f"unknown outputs {sorted(unknown)}", hint=f"ask for {OUTPUT_NAMES}")
    if req.budgets is None:
        return  # no 'reconstructions' then, even when asked for (Triton asks for all by default)
    b = req.budgets
    if b.is_floating_point() or b.ndim != 2 or b.shape[0] != n:
        raise InputError(f"budgets must be an integer tensor [n={n}, n_budgets], got "
                         f"{tuple(b.shape)} {b.dtype}")
    if not 1 <= b.shape[1] <= MAX_BUDGETS:
        raise InputError(f"budgets must have 1..{MAX_BUDGETS} columns, got {b.shape[1]}")
    sae.check_budgets(sorted(set(b.reshape(-1).tolist())))


def _masked(code: SparseCode, k: Tensor) -> SparseCode:
    """``code [N, K]`` with positions ``>= k[row]`` set to (0, -1); ``k [N]``."""
    positions = torch.arange(code.values.shape[1], device=code.values.device)
    keep = positions < k.to(code.values.device)[:, None]  # (N, K)
    return SparseCode(code.values.masked_fill(~keep, 0.0), code.indices.masked_fill(~keep, -1))


def _reconstructions(sae: SAE, code: SparseCode, budgets: Tensor) -> Tensor:
    """``[N, n_budgets, d_in]`` from ``code [N, K]`` and per-row ``budgets [N, n_budgets]``."""
    first = budgets[0]
    if bool((budgets == first).all()):  # one list for every row: prefix sums, one gather
        recons = sae.reconstruct_from_code(code, first.tolist())  # (n_budgets, N, d_in)
        return recons.transpose(0, 1)
    cols = [sae.decode(_masked(code, budgets[:, j])) for j in range(budgets.shape[1])]
    return torch.stack(cols, dim=1)  # (N, n_budgets, d_in)


@torch.no_grad()
def run_batch(
    sae: SAE, requests: Sequence[BatchRequest]
) -> list[dict[str, Tensor] | HSAEError]:
    """Outputs per request, in order: a dict of the asked-for outputs, or the request's error.

    Output floats come back in each request's own ``x`` dtype, on the SAE's device. One encode
    serves the batch.
    """
    results: list[dict[str, Tensor] | HSAEError] = []
    good: list[int] = []
    for i, req in enumerate(requests):
        try:
            check_request(sae, req)
        except HSAEError as err:
            results.append(err)
            continue
        results.append({})
        good.append(i)
    if not good:
        return results
    reqs = [requests[i] for i in good]
    x = torch.cat([r.x.to(sae.dtype) for r in reqs])  # (N, d_in)
    k = torch.cat([r.k.reshape(-1) for r in reqs]).to(sae.device, torch.int64)  # (N,)
    k_top = int(k.max())
    for r in reqs:
        if r.budgets is not None and "reconstructions" in r.outputs:
            k_top = max(k_top, int(r.budgets.max()))
    code = sae.encode(x, k_top)  # (N, k_top), unmasked
    k_max = sae.config.k_max
    start = 0
    for i, req in zip(good, reqs):
        n = req.x.shape[0]
        rows = SparseCode(code.values[start:start + n], code.indices[start:start + n])
        own = _masked(rows, k[start:start + n])
        start += n
        out: dict[str, Tensor] = {}
        wire = req.x.dtype
        if "values" in req.outputs or "indices" in req.outputs:
            pad = k_max - k_top
            out["values"] = torch.nn.functional.pad(own.values, (0, pad)).to(wire)
            out["indices"] = torch.nn.functional.pad(own.indices, (0, pad), value=-1)
        if "reconstruction" in req.outputs:
            out["reconstruction"] = sae.decode(own).to(wire)
        if "reconstructions" in req.outputs and req.budgets is not None:
            out["reconstructions"] = _reconstructions(
                sae, rows, req.budgets.to(sae.device, torch.int64)).to(wire)
        results[i] = {name: t for name, t in out.items() if name in req.outputs}
    return results
