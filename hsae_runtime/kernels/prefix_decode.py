"""Reconstructions at several budgets in one pass over the gathered decoder rows (Triton).

``prefix_decode(values [N, K], indices [N, K], W_dec [d_sae, d_in], b_dec [d_in], budgets)``
-> ``[n_budgets, N, d_in]`` in the order of ``budgets`` (each ≤ K): for budget b,
``b_dec + Σ_{j<b} values[:, j] · W_dec[indices[:, j]]``; index -1 contributes nothing. This is
``SAE.reconstruct_from_code``; :func:`prefix_decode_reference` is that torch code (segment sums
with ``F.embedding_bag``) and the definition the kernel is tested against.

The kernel: grid ``(N, cdiv(d_in, BLOCK_D))``; each program keeps one float32 accumulator of
``BLOCK_D`` columns, walks the row's code in order, adds ``value · W_dec[index, cols]`` and
stores the accumulator whenever it reaches the next budget. Each decoder row is read once per
token whatever the number of budgets (the torch path re-adds partial sums per budget), and no
``[N, K, d_in]`` or dense ``[N, d_sae]`` tensor exists.

Dispatch uses the kernel on CUDA when no gradient is needed; kernels are defined on first use
(so ``TRITON_INTERPRET=1`` set before that runs them on the CPU).
"""

# Triton's jit functions take ints for ``tl.constexpr`` parameters and overload operators on
# ``tl.tensor``; type checkers cannot see either.
# pyright: reportArgumentType=false, reportOperatorIssue=false

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae_runtime.kernels.topk import triton_available

BLOCK_D = 256


def _segment(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    masked = indices < 0
    if bool(masked.any()):
        indices = indices.masked_fill(masked, 0)
        values = values.masked_fill(masked, 0.0)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def prefix_decode_reference(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                            budgets: Sequence[int]) -> Tensor:
    """Segment sums between consecutive sorted budgets, accumulated -> ``[n_budgets, N, d_in]``."""
    out: dict[int, Tensor] = {}
    running = b_dec.expand(values.shape[0], -1)
    start = 0
    for b in sorted(set(budgets)):
        running = running + _segment(values[:, start:b], indices[:, start:b], W_dec)
        out[b] = running
        start = b
    return torch.stack([out[b] for b in budgets])


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def prefix_decode_kernel(val_ptr, idx_ptr, w_ptr, b_ptr, bounds_ptr, out_ptr,
                             n_rows, stride_code, stride_w, d_in, n_budgets,
                             BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d_in
        acc = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        code = row.to(tl.int64) * stride_code
        for b in range(0, n_budgets):
            # Each segment's bounds are loaded, not carried over from the previous iteration:
            # a `start` that began as the Python int 0 and was reassigned in the loop ran right
            # in the interpreter but, compiled for CUDA, re-added the earlier segments.
            start = tl.load(bounds_ptr + b)
            end = tl.load(bounds_ptr + b + 1)
            for j in range(start, end):
                idx = tl.load(idx_ptr + code + j)
                v = tl.load(val_ptr + code + j).to(tl.float32)
                v = tl.where(idx >= 0, v, 0.0)
                w = tl.load(w_ptr + tl.maximum(idx, 0) * stride_w + cols, mask=cmask, other=0.0)
                acc += v * w.to(tl.float32)
            dst = out_ptr + (b * n_rows + row).to(tl.int64) * d_in + cols
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    return prefix_decode_kernel


def prefix_decode_triton(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                         budgets: Sequence[int], *, block_d: int = BLOCK_D) -> Tensor:
    """The Triton kernel (no autograd). Same contract as :func:`prefix_decode_reference`."""
    import triton

    n, k = values.shape
    d_in = W_dec.shape[1]
    ordered = sorted(set(int(b) for b in budgets))
    if not ordered or ordered[0] < 1 or ordered[-1] > k:
        raise ValueError(f"budgets must lie in 1..{k}, got {list(budgets)}")
    values = values.contiguous()
    indices = indices.to(torch.int64).contiguous()
    W_dec = W_dec.contiguous()
    bounds = torch.tensor([0, *ordered], dtype=torch.int32, device=values.device)  # segments
    out = torch.empty(len(ordered), n, d_in, dtype=W_dec.dtype, device=values.device)
    grid = (n, triton.cdiv(d_in, block_d))
    _kernel()[grid](values, indices, W_dec, b_dec.contiguous(), bounds, out, n, k, W_dec.stride(0),
                    d_in, len(ordered), BLOCK_D=block_d)
    if list(budgets) == ordered:
        return out
    pos = {b: i for i, b in enumerate(ordered)}
    return out[torch.tensor([pos[int(b)] for b in budgets], device=out.device)]


def prefix_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                  budgets: Sequence[int]) -> Tensor:
    """Dispatch: the Triton kernel on CUDA when no gradient is needed, else torch."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (values, W_dec, b_dec)
    )
    if values.is_cuda and not needs_grad and triton_available():
        return prefix_decode_triton(values, indices, W_dec, b_dec, budgets)
    return prefix_decode_reference(values, indices, W_dec, b_dec, budgets)
