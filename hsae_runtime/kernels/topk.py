"""Sorted top-k of encoder pre-activations with a per-row budget mask (Triton, CUDA path).

``masked_topk(pre [N, d_sae], k_top, k_rows [N] | None) -> (values, indices) [N, k_top]``:
the top ``k_top`` pre-activations of each row, sorted descending, ReLU'd, and — with
``k_rows`` — each row's entries at positions ≥ ``k_rows[row]`` set to value 0 / index -1. This
is exactly what ``SAE.encode`` does with ``torch.topk``; :func:`masked_topk_reference` is that
torch code and the definition the kernel is tested against.

The kernel, in two launches:

1. *block top-k*: grid ``(N, n_blocks)``; each program loads ``BLOCK`` pre-activations and packs
   each (value, latent id) into one int64 key whose signed order is the value's order: the
   float's bits, flipped so that integer order is float order, in the high 32 bits and
   ``2³¹ − 1 − id`` in the low 32 (ties go to the lower id). One ``tl.topk`` over the keys
   sorts values and ids together; the best ``K_PAD`` keys of each block are written out.
2. *merge*: grid ``(N,)``; one ``tl.topk`` over the row's ``n_blocks · K_PAD`` candidates, then
   unpack, ReLU, mask at the row's own budget, store ``k_top`` entries.

``K_PAD`` is ``k_top`` rounded up to a power of two, at least 2 (``tl.topk`` needs a power of
two, and ``tl.topk(x, 1)`` runs in the interpreter but does not compile on CUDA). Rows wider
than ``MAX_CANDIDATES / K_PAD`` blocks fall back to the reference, as do inputs that need gradients
(the kernel has no backward) and non-CUDA tensors. Kernels are defined on first use, so
``TRITON_INTERPRET=1`` set before that runs them on the CPU (the tests do).
"""

# Triton's jit functions take ints for ``tl.constexpr`` parameters and overload operators on
# ``tl.tensor``; type checkers cannot see either.
# pyright: reportArgumentType=false, reportOperatorIssue=false

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 2048  # pre-activations per block program
MAX_CANDIDATES = 16384  # keys one merge program sorts
MAX_K = 1024
# The kernel beats torch.topk only on small batches (N · d_sae · K_PAD up to this bound; numbers
# in docs/benchmarks-core.md). Serving batches are small; training-size batches take torch.topk.
MAX_KERNEL_WORK = 2**28


def masked_topk_reference(pre: Tensor, k_top: int, k_rows: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """``pre [N, d_sae]`` -> sorted, ReLU'd, row-masked ``(values, indices) [N, k_top]``."""
    values, indices = torch.topk(pre, k_top, dim=-1, sorted=True)  # (N, k_top)
    values = F.relu(values)
    if k_rows is not None:
        keep = torch.arange(k_top, device=values.device) < k_rows[:, None]  # (N, k_top)
        values = values.masked_fill(~keep, 0.0)
        indices = indices.masked_fill(~keep, -1)
    return values, indices


@functools.cache
def triton_available() -> bool:
    try:
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def block_topk(pre_ptr, cand_ptr, d_sae, stride_pre, n_blocks,
                   BLOCK: tl.constexpr, K_PAD: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(pre_ptr + row.to(tl.int64) * stride_pre + offs, mask=offs < d_sae,
                    other=float("-inf")).to(tl.float32)
        bits = v.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
        key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)
        top = tl.topk(key, K_PAD)  # (K_PAD,) descending
        out = cand_ptr + (row.to(tl.int64) * n_blocks + blk) * K_PAD + tl.arange(0, K_PAD)
        tl.store(out, top)

    @triton.jit
    def merge(cand_ptr, values_ptr, indices_ptr, k_rows_ptr, n_cand, k_top,
              M: tl.constexpr, K_PAD: tl.constexpr, HAS_K_ROWS: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, M)
        keys = tl.load(cand_ptr + row.to(tl.int64) * n_cand + offs, mask=offs < n_cand,
                       other=-9223372036854775807 - 1)
        top = tl.topk(keys, K_PAD)  # (K_PAD,) descending
        idx = 0x7FFFFFFF - (top & 0xFFFFFFFF)
        ordered = (top >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        val = tl.maximum(bits.to(tl.float32, bitcast=True), 0.0)
        pos = tl.arange(0, K_PAD)
        if HAS_K_ROWS:
            keep = pos < tl.load(k_rows_ptr + row)
            val = tl.where(keep, val, 0.0)
            idx = tl.where(keep, idx, -1)
        base = row.to(tl.int64) * k_top + pos
        tl.store(values_ptr + base, val, mask=pos < k_top)
        tl.store(indices_ptr + base, idx, mask=pos < k_top)

    return block_topk, merge


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _k_pad(k_top: int) -> int:
    """Keys each block keeps: ``k_top`` rounded up to a power of two, at least 2 (``tl.topk(x, 1)``
    fails to compile on CUDA with Triton 3.6, though the interpreter runs it)."""
    return max(2, _next_pow2(k_top))


def masked_topk_triton(pre: Tensor, k_top: int, k_rows: Tensor | None = None, *,
                       block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """The Triton kernel (no autograd). Same contract as :func:`masked_topk_reference`."""
    import triton

    n, d_sae = pre.shape
    k_pad = _k_pad(k_top)
    block = max(_next_pow2(min(block, d_sae)), k_pad)
    n_blocks = triton.cdiv(d_sae, block)
    n_cand = n_blocks * k_pad
    if not 1 <= k_top <= min(d_sae, MAX_K) or n_cand > MAX_CANDIDATES:
        raise ValueError(f"masked_topk_triton: k_top={k_top}, d_sae={d_sae} out of kernel range")
    pre = pre.contiguous()
    cand = torch.empty(n, n_cand, dtype=torch.int64, device=pre.device)
    values = torch.empty(n, k_top, dtype=pre.dtype, device=pre.device)
    indices = torch.empty(n, k_top, dtype=torch.int64, device=pre.device)
    block_topk, merge = _kernels()
    block_topk[(n, n_blocks)](pre, cand, d_sae, pre.stride(0), n_blocks, BLOCK=block, K_PAD=k_pad)
    rows = k_rows.to(torch.int64).contiguous() if k_rows is not None else indices
    merge[(n,)](cand, values, indices, rows, n_cand, k_top, M=_next_pow2(n_cand), K_PAD=k_pad,
                HAS_K_ROWS=k_rows is not None)
    return values, indices


def masked_topk(pre: Tensor, k_top: int, k_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch: the Triton kernel on CUDA (no grad needed, in range, small batch), else torch."""
    d_sae = pre.shape[-1]  # the reference takes any leading dims; the kernel wants 2-D
    n = pre.numel() // max(d_sae, 1)
    k_pad = _k_pad(k_top)
    n_blocks = -(-d_sae // max(_next_pow2(min(BLOCK, d_sae)), k_pad))
    use_kernel = (
        pre.is_cuda
        and not (pre.requires_grad and torch.is_grad_enabled())
        and pre.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and k_top <= MAX_K
        and n * d_sae * k_pad <= MAX_KERNEL_WORK
        and n_blocks * k_pad <= MAX_CANDIDATES
        and pre.dim() == 2
        and triton_available()
    )
    if use_kernel:
        return masked_topk_triton(pre, k_top, k_rows)
    return masked_topk_reference(pre, k_top, k_rows)
