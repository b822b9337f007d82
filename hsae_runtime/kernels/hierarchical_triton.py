"""Triton kernels for the HierarchicalTopK loss (the CUDA path).

Same algorithm as ``kernels/hierarchical_cpu.py`` and the ``flat`` torch reference in
``loss.py``. The grid is ``(N tokens, d_in blocks)``: the loss is a sum over columns, so each
program walks all K prefixes of one token on one block of columns and writes a partial loss;
the backward walks the prefixes in reverse, writes partial ``dv`` dot products (summed over
blocks afterwards) and scatters ``−v_j g_j`` into ``dW`` rows with atomics (tokens share
latents). No ``[N, K, d_in]`` buffer.

Correctness is tested on CPU with ``TRITON_INTERPRET=1`` (tests/test_kernels_loss.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # optional dependency (Linux x86_64 wheels only)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None


def available() -> bool:
    return triton is not None


def supports(x: Tensor) -> bool:
    return available() and x.is_cuda and x.dtype in (torch.float32, torch.float64)


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, v_ptr, idx_ptr, w_ptr, b_ptr, coef_ptr, r_ptr, part_ptr,
                        K, D, n_blocks, BLOCK_D: tl.constexpr):  # pragma: no cover - jitted
        n = tl.program_id(0)
        blk = tl.program_id(1)
        cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = cols < D
        r = tl.load(x_ptr + n * D + cols, mask=inside, other=0.0)
        r = r - tl.load(b_ptr + cols, mask=inside, other=0.0)
        acc = tl.sum(r * 0.0, axis=0)
        for j in range(K):
            lat = tl.load(idx_ptr + n * K + j)
            keep = lat >= 0
            v = tl.where(keep, tl.load(v_ptr + n * K + j), 0.0)
            e = tl.load(w_ptr + tl.where(keep, lat, 0) * D + cols, mask=inside, other=0.0)
            r = r - v * e
            acc += tl.load(coef_ptr + j) * tl.sum(r * r, axis=0)
        tl.store(r_ptr + n * D + cols, r, mask=inside)
        tl.store(part_ptr + n * n_blocks + blk, acc)

    @triton.jit
    def _backward_kernel(r_ptr, v_ptr, idx_ptr, w_ptr, coef2_ptr, dw_ptr, g1_ptr, dvp_ptr,
                         N, K, D, BLOCK_D: tl.constexpr):  # pragma: no cover - jitted
        n = tl.program_id(0)
        blk = tl.program_id(1)
        cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = cols < D
        r = tl.load(r_ptr + n * D + cols, mask=inside, other=0.0)
        g = r * 0.0
        for jj in range(K):
            j = K - 1 - jj
            g += tl.load(coef2_ptr + j) * r  # g_j = g_{j+1} + 2 c_j r_j
            lat = tl.load(idx_ptr + n * K + j)
            keep = lat >= 0
            v = tl.where(keep, tl.load(v_ptr + n * K + j), 0.0)
            row = tl.where(keep, lat, 0) * D
            e = tl.load(w_ptr + row + cols, mask=inside, other=0.0)
            dot = tl.where(keep, tl.sum(g * e, axis=0), 0.0)
            tl.store(dvp_ptr + (blk * N + n) * K + j, -dot)
            # masked entries (v = 0) add zeros to row 0: harmless, and keeps the mask simple
            tl.atomic_add(dw_ptr + row + cols, -v * g, mask=inside)
            r = r + v * e  # r_{j-1}
        tl.store(g1_ptr + n * D + cols, g, mask=inside)


def _block(d: int) -> int:
    assert triton is not None
    return min(256, triton.next_power_of_2(d))


def forward(
    x: Tensor, values: Tensor, indices: Tensor, W: Tensor, b: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as ``hierarchical_cpu.forward``."""
    assert triton is not None
    n, d = x.shape
    k = values.shape[1]
    block = _block(d)
    n_blocks = triton.cdiv(d, block)
    R = torch.empty_like(x)
    part = torch.empty(n, n_blocks, dtype=x.dtype, device=x.device)
    coef_d = coef.to(device=x.device, dtype=x.dtype)
    _forward_kernel[(n, n_blocks)](x, values, indices, W, b, coef_d, R, part, k, d, n_blocks,
                                   BLOCK_D=block)  # pyright: ignore[reportArgumentType]
    return part.double().sum(), R


def backward(
    R: Tensor, values: Tensor, indices: Tensor, W: Tensor, coef2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as ``hierarchical_cpu.backward``."""
    assert triton is not None
    n, d = R.shape
    k = values.shape[1]
    block = _block(d)
    n_blocks = triton.cdiv(d, block)
    dW = torch.zeros_like(W)
    G1 = torch.empty_like(R)
    dv_part = torch.empty(n_blocks, n, k, dtype=R.dtype, device=R.device)
    _backward_kernel[(n, n_blocks)](R, values, indices, W, coef2, dW, G1, dv_part, n, k, d,
                                    BLOCK_D=block)  # pyright: ignore[reportArgumentType]
    return dv_part.sum(0), dW, G1
