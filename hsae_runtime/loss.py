"""The HierarchicalTopK loss and the plain TopK loss.

For a sorted code ``(values, indices) [N, K]`` and prefix budgets ``J`` (default 1..K)::

    L = mean_{j ∈ J} mean_{n, d} (x − b_dec − Σ_{i ≤ j} v_i W_dec[idx_i])²

(equal weights over prefixes, as the authors' reference does). One function, four
implementations of the same math, chosen by :func:`hierarchical_topk_loss`:

* ``"reference"``: cumulative sum; allocates ``[N, K, d_in]`` (~600 MB at N=1024, K=64,
  d_in=2304). The definition the others are tested against.
* ``"flat"``: memory-flat custom autograd in plain torch, any device. The forward keeps a
  running residual, the backward walks the prefixes in reverse with a running suffix sum of
  residual gradients; peak extra memory is a few ``[N, d_in]`` buffers.
* ``"cpu"``: the same algorithm fused into numba kernels (``kernels/hierarchical_cpu.py``),
  one pass over the gathered rows per direction. The default on CPU when numba imports.
* ``"triton"``: the same algorithm as Triton kernels (``kernels/hierarchical_triton.py``); the
  default on CUDA when triton imports.

Masked entries (index −1, value 0, as produced by per-row budgets) contribute nothing and get
zero value-gradient in every implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae_runtime.errors import InputError

Impl = Literal["auto", "reference", "flat", "cpu", "triton"]


# ---------------------------------------------------------------------------- helpers
def _check(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> None:
    if x.ndim != 2 or values.ndim != 2 or values.shape != indices.shape:
        raise InputError(
            "expected x [N, d_in] and values/indices [N, K], got "
            f"{tuple(x.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}"
        )
    if values.shape[0] != x.shape[0] or values.shape[1] == 0:
        raise InputError(f"values {tuple(values.shape)} must be [N={x.shape[0]}, K>=1]")
    if W_dec.ndim != 2 or W_dec.shape[1] != x.shape[1] or b_dec.shape != (x.shape[1],):
        raise InputError(
            f"W_dec must be [d_sae, d_in={x.shape[1]}] and b_dec [d_in], got "
            f"{tuple(W_dec.shape)} and {tuple(b_dec.shape)}"
        )
    if indices.is_floating_point():
        raise InputError(f"indices must be integers, got dtype {indices.dtype}")


def prefix_weights(k: int, budgets: Sequence[int] | None, *, n: int, d: int) -> Tensor:
    """Per-prefix weights ``coef [K]`` (float64): ``L = Σ_j coef_j Σ_{n,d} r_{n,j,d}²``.

    ``coef_j = (#times j appears in budgets) / (|budgets| · N · d_in)``, so a repeated budget
    weighs double, exactly as indexing the per-prefix means would.
    """
    coef = torch.zeros(k, dtype=torch.float64)
    if budgets is None:
        coef += 1.0 / k
    else:
        budgets = [int(b) for b in budgets]
        if not budgets:
            raise InputError("budgets must not be empty")
        bad = [b for b in budgets if not 1 <= b <= k]
        if bad:
            raise InputError(f"budgets must lie in 1..K={k} (the code width), got {bad}")
        for b in budgets:
            coef[b - 1] += 1.0 / len(budgets)
    return coef / (n * d)


def _unmask(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Replace masked entries (index −1) by (value 0, index 0); a no-op without masks."""
    masked = indices < 0
    if bool(masked.any()):
        return values.masked_fill(masked, 0.0), indices.masked_fill(masked, 0)
    return values, indices


# ---------------------------------------------------------------------------- reference
def hierarchical_topk_loss_reference(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    budgets: Sequence[int] | None = None,
) -> Tensor:
    """Plain cumulative-sum reference; allocates ``[N, K, d_in]``."""
    _check(x, values, indices, W_dec, b_dec)
    n, k = values.shape
    values, indices = _unmask(values, indices)
    rows = F.embedding(indices, W_dec) * values[..., None]  # (N, K, d_in)
    recon = b_dec + rows.cumsum(dim=1)  # (N, K, d_in)
    per_prefix = (recon - x[:, None, :]).pow(2).mean(dim=(0, 2))  # (K,)
    if budgets is None:
        return per_prefix.mean()
    prefix_weights(k, budgets, n=1, d=1)  # validates
    sel = torch.as_tensor([int(b) - 1 for b in budgets], device=per_prefix.device)
    return per_prefix[sel].mean()


def prefix_errors(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *,
    grad: bool = False,
) -> Tensor:
    """Per-prefix MSE ``[K]``: ``mean_{n,d} (x − x̂_j)²`` for j = 1..K (a running residual).

    Memory stays at a few ``[N, d_in]`` buffers; without ``grad`` it runs under ``no_grad``
    (the trainer measures prefix errors on a small sub-batch to balance the prefix weights).
    """
    _check(x, values, indices, W_dec, b_dec)
    values, indices = _unmask(values, indices)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        r = x - b_dec  # (N, d_in)
        out = []
        for j in range(values.shape[1]):
            r = r - values[:, j, None] * W_dec[indices[:, j]]
            out.append(r.pow(2).mean())
        return torch.stack(out)  # (K,)


# ---------------------------------------------------------------------------- memory-flat
def _flat_forward(x, values, indices, W, b, coef):
    """Pure torch: running residual, one ``[N, d_in]`` gather per prefix."""
    r = x - b  # (N, d_in)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for j in range(values.shape[1]):
        e = F.embedding(indices[:, j], W)  # (N, d_in)
        r.addcmul_(values[:, j, None], e, value=-1.0)
        if coef[j] != 0:
            total += coef[j] * torch.linalg.vector_norm(r).double().pow(2)
    return total, r


def _flat_backward(R, values, indices, W, coef2):
    """Reverse walk over prefixes; ``dW`` rows accumulate with ``index_add_``."""
    dW = torch.zeros_like(W)
    dv = torch.empty_like(values)
    g = torch.zeros_like(R)  # (N, d_in): suffix sum of residual gradients
    r = R.clone()
    for j in range(values.shape[1] - 1, -1, -1):
        if coef2[j] != 0:
            g.add_(r, alpha=float(coef2[j]))
        e = F.embedding(indices[:, j], W)  # (N, d_in)
        v = values[:, j, None]
        dv[:, j] = -torch.linalg.vecdot(g, e)
        dW.index_add_(0, indices[:, j], g * v, alpha=-1.0)
        r.addcmul_(v, e)
    return dv, dW, g


# ---------------------------------------------------------------------------- dispatch
def _backend(impl: str):
    match impl:
        case "flat":
            return _flat_forward, _flat_backward
        case "cpu":
            from hsae_runtime.kernels import hierarchical_cpu

            return hierarchical_cpu.forward, hierarchical_cpu.backward
        case "triton":
            from hsae_runtime.kernels import hierarchical_triton

            return hierarchical_triton.forward, hierarchical_triton.backward
        case other:
            raise ValueError(f"unknown hierarchical loss backend {other!r}")


class _HierarchicalLoss(torch.autograd.Function):
    """Memory-flat autograd shell shared by the ``flat``, ``cpu`` and ``triton`` backends."""

    @staticmethod
    def forward(ctx, x, values, W_dec, b_dec, indices, coef, impl):  # type: ignore[override]
        fwd, _ = _backend(impl)
        loss, R = fwd(x, values, indices, W_dec, b_dec, coef)
        ctx.save_for_backward(R, values, indices, W_dec, coef)
        ctx.impl = impl
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        R, values, indices, W_dec, coef = ctx.saved_tensors
        _, bwd = _backend(ctx.impl)
        coef2 = (2.0 * coef * float(grad_out)).to(device=R.device, dtype=R.dtype)
        dv, dW, G1 = bwd(R, values, indices, W_dec, coef2)
        dx = G1 if ctx.needs_input_grad[0] else None
        db = -G1.sum(0) if ctx.needs_input_grad[3] else None
        return dx, dv, dW, db, None, None, None


def _auto_impl(x: Tensor) -> str:
    if x.device.type == "cpu":
        from hsae_runtime.kernels import hierarchical_cpu

        return "cpu" if hierarchical_cpu.supports(x) else "flat"
    if x.device.type == "cuda":
        from hsae_runtime.kernels import hierarchical_triton

        return "triton" if hierarchical_triton.supports(x) else "flat"
    return "flat"


def hierarchical_topk_loss(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    budgets: Sequence[int] | None = None, *, impl: Impl = "auto",
    weights: Tensor | None = None,
) -> Tensor:
    """Mean over prefix budgets of the per-element MSE of the prefix reconstructions.

    ``x [N, d_in]``; ``values, indices [N, K]`` sorted descending (index −1 = masked entry,
    value 0); ``W_dec [d_sae, d_in]``; ``b_dec [d_in]``; ``budgets`` prefix lengths in 1..K
    (default all of 1..K, equal weights). Returns a scalar in ``x``'s dtype. Gradients flow to
    ``x``, ``values``, ``W_dec`` and ``b_dec``. ``impl`` forces one implementation (tests,
    benchmarks); ``"auto"`` picks the fused kernel for the device, else ``"flat"``.
    ``weights [K]`` (non-negative, summing to 1) replaces the equal weights over ``budgets``:
    ``L = Σ_j weights_j · mean_{n,d} r_{n,j,d}²`` (the trainer's prefix balancing).
    """
    _check(x, values, indices, W_dec, b_dec)
    n, k = values.shape
    if weights is not None:
        if weights.shape != (k,) or not bool(torch.isfinite(weights).all()) or bool(
            (weights < 0).any()
        ):
            raise InputError(f"weights must be [K={k}] finite and >= 0, got {tuple(weights.shape)}")
        coef = weights.detach().double().cpu() / (n * x.shape[1])
    else:
        coef = prefix_weights(k, budgets, n=n, d=x.shape[1])
    if impl == "auto":
        impl = _auto_impl(x)  # type: ignore[assignment]
    if impl == "reference":
        if weights is not None:
            per = prefix_errors(x, values, indices, W_dec, b_dec, grad=True)  # (K,)
            return (per * weights.to(per)).sum()
        return hierarchical_topk_loss_reference(x, values, indices, W_dec, b_dec, budgets)
    if impl not in ("flat", "cpu", "triton"):
        raise ValueError(f"impl must be one of auto, reference, flat, cpu, triton; got {impl!r}")
    dtype = W_dec.dtype
    values = values.to(dtype)
    if impl == "flat":
        values, indices = _unmask(values, indices)
    else:
        x, values, W_dec, b_dec = (t.contiguous() for t in (x.to(dtype), values, W_dec, b_dec))
        indices = indices.to(torch.int64).contiguous()
    return _HierarchicalLoss.apply(x, values, W_dec, b_dec, indices, coef, impl)


def topk_loss(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Plain TopK MSE of the full code (the fixed-k baseline): ``mean (x − x̂_K)²``.

    Same shapes as :func:`hierarchical_topk_loss`; decodes with ``F.embedding_bag``.
    """
    _check(x, values, indices, W_dec, b_dec)
    values, indices = _unmask(values, indices)
    recon = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    return (recon - x).pow(2).mean()
