"""HierarchicalTopK loss (placeholder reference; the loss work replaces the dispatch).

L = mean_{j in budgets} mean_{n, d} (x - b_dec - sum_{i<=j} v_i W_dec[idx_i])^2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def hierarchical_topk_loss_reference(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    budgets: Sequence[int] | None = None,
) -> Tensor:
    """Plain cumulative-sum reference; allocates ``[N, K, d_in]``."""
    n, k = values.shape
    rows = F.embedding(indices, W_dec) * values[..., None]  # (N, K, d_in)
    recon = b_dec + rows.cumsum(dim=1)  # (N, K, d_in)
    per_prefix = (recon - x[:, None, :]).pow(2).mean(dim=(0, 2))  # (K,)
    if budgets is None:
        return per_prefix.mean()
    sel = torch.as_tensor([b - 1 for b in budgets], device=per_prefix.device)
    return per_prefix[sel].mean()


def hierarchical_topk_loss(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    budgets: Sequence[int] | None = None,
) -> Tensor:
    return hierarchical_topk_loss_reference(x, values, indices, W_dec, b_dec, budgets)


def topk_loss(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Plain TopK MSE of the full code (the fixed-k baseline)."""
    recon = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    return (recon - x).pow(2).mean()
