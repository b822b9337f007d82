"""The lean training encoder: top-k forward, k-sparse backward.

Autograd through ``topk(x @ W_enc + b_enc)`` spends a dense ``[N, d_sae]`` gradient and a full
``N × d_sae × d_in`` matmul per backward (with ``apply_b_dec_to_input`` it does so even for
``b_dec`` alone), although only the k selected latents of each token have a nonzero gradient.
:class:`SparseTopKEncode` keeps that sparsity (as sparsify's fused encoder does):

* ``dW_enc[:, l] = Σ_{idx[n,j]=l} dpre[n,j] · xc[n]``: a fused numba kernel writes the dense
  ``[d_in, d_sae]`` gradient in one pass (``kernels/encoder_cpu.py``); elsewhere, rows of the
  transpose accumulate with ``index_add_`` in token chunks;
* ``db_enc = index_add(dpre)`` over the selected latents;
* ``d(xc)[n] = Σ_j dpre[n,j] W_enc[:, idx[n,j]]`` (a gather of k encoder columns per token), or,
  when only ``b_dec`` needs it, the one matvec ``−W_enc @ db_enc``.

Ties at the k-th value are broken as ``torch.topk`` breaks them; the gradients equal autograd's
through the dense path for the same selection (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Tokens per index_add_ chunk in the torch fallback: bounds the [chunk, k, d_in] temporary.
_CHUNK = 64


def _grad_w_enc_torch(xc: Tensor, indices: Tensor, dpre: Tensor, d_sae: int) -> Tensor:
    """``[d_in, d_sae]`` via row accumulation into the transpose (any device)."""
    n, k = indices.shape
    grad_t = torch.zeros(d_sae, xc.shape[1], dtype=xc.dtype, device=xc.device)  # (d_sae, d_in)
    keep = indices >= 0
    idx = indices.clamp_min(0)
    coef = dpre.masked_fill(~keep, 0.0)
    for lo in range(0, n, _CHUNK):
        rows = coef[lo:lo + _CHUNK, :, None] * xc[lo:lo + _CHUNK, None, :]  # (c, k, d_in)
        grad_t.index_add_(0, idx[lo:lo + _CHUNK].reshape(-1), rows.reshape(-1, xc.shape[1]))
    return grad_t.t()


def _grad_w_enc(xc: Tensor, indices: Tensor, dpre: Tensor, d_sae: int) -> Tensor:
    from hsae_runtime.kernels import encoder_cpu

    if encoder_cpu.supports(xc):
        return encoder_cpu.grad_w_enc(xc, indices, dpre, d_sae)
    return _grad_w_enc_torch(xc, indices, dpre, d_sae)


class SparseTopKEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_dec) -> (values, indices)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, apply_b_dec):  # type: ignore[override]
        xc = x - b_dec if apply_b_dec else x  # (N, d_in)
        pre = torch.addmm(b_enc, xc, W_enc)  # (N, d_sae)
        top, indices = torch.topk(pre, k, dim=-1, sorted=True)  # (N, k)
        del pre
        values = F.relu(top)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(xc, W_enc, indices, values)
        ctx.apply_b_dec = apply_b_dec
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):  # type: ignore[override]
        xc, W_enc, indices, values = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        dpre = grad_values * (values > 0)  # (N, k): ReLU after top-k
        d_sae = W_enc.shape[1]
        dW = _grad_w_enc(xc, indices, dpre, d_sae) if need_w else None
        db_enc = None
        if need_be or (need_bd and not need_x):
            db_enc = torch.zeros(d_sae, dtype=dpre.dtype, device=dpre.device)
            db_enc.index_add_(0, indices.reshape(-1), dpre.reshape(-1))
        dx = db_dec = None
        if need_x:
            # k encoder columns per token, gathered as rows of W_encᵀ.
            dxc = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=dpre,
                                  mode="sum")  # (N, d_in)
            dx = dxc
            if need_bd and ctx.apply_b_dec:
                db_dec = -dxc.sum(0)
        elif need_bd and ctx.apply_b_dec:
            assert db_enc is not None
            db_dec = -(W_enc @ db_enc)  # Σ_n dxc[n] without forming dxc
        return dx, dW, db_enc if need_be else None, db_dec, None, None


def encode_for_training(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, *, apply_b_dec: bool = True
) -> tuple[Tensor, Tensor]:
    """Sorted top-k code of ``x [N, d_in]`` with a k-sparse backward.

    Returns ``values [N, k]`` (after ReLU, differentiable w.r.t. ``x``, ``W_enc``, ``b_enc``,
    ``b_dec``) and ``indices [N, k]`` (int64, no gradient).
    """
    return SparseTopKEncode.apply(x, W_enc, b_enc, b_dec, k, apply_b_dec)
