"""The input checks of an SAE engine, shared by the torch :class:`~hsae_runtime.sae.SAE` and the
ONNX Runtime :class:`~hsae_runtime.onnx_backend.OnnxSAE`.

Each raises :class:`~hsae_runtime.errors.InputError` with a hint on bad input, so both engines
refuse the same inputs with the same messages. The server validates its requests once, on the
wire (:mod:`hsae_runtime.serving.convert`), and its backends call the engines' unchecked math.

Shapes: ``N`` rows (leading dims flattened), ``d_in``, ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hsae_runtime.errors import InputError


def check_activation_shape(x: object, d_in: int) -> None:
    """Raise unless ``x`` is a non-empty float tensor ``[..., d_in]`` (finiteness: the caller)."""
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise InputError(
            f"x must have shape [..., d_in={d_in}], got {tuple(x.shape)}",
            hint="the activations must come from the hookpoint the SAE was trained on",
        )
    if x.numel() == 0:
        raise InputError("x is empty: need at least one token")


def check_budget(k: object, k_max: int) -> int:
    """``k`` if it is an int (not a bool) in ``1..k_max``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"budget k must be an int, got {type(k).__name__}")
    if not 1 <= k <= k_max:
        raise InputError(
            f"budget k={k} is out of range 1..k_max={k_max}",
            hint=f"this SAE was trained with k_max={k_max}; ask for a budget at most that",
        )
    return k


def check_budgets(budgets: Sequence[int], k_max: int) -> list[int]:
    """A non-empty list of budgets, each passing :func:`check_budget` (order kept)."""
    out = list(budgets)
    if not out:
        raise InputError("budgets must not be empty")
    return [check_budget(int(b) if not isinstance(b, bool) else b, k_max) for b in out]


def check_row_budgets(k: Tensor, n: int, k_max: int) -> Tensor:
    """Per-row budgets ``[N]`` (any integer dtype, any leading shape) -> ``[N]`` int64."""
    if k.is_floating_point() or k.dtype == torch.bool:
        raise InputError(f"per-row budgets must be an integer tensor, got dtype {k.dtype}")
    k = k.detach().reshape(-1)
    if k.numel() != n:
        raise InputError(f"per-row budgets have {k.numel()} entries but x has {n} rows")
    lo, hi = int(k.min()), int(k.max())
    if lo < 1 or hi > k_max:
        raise InputError(f"per-row budgets must lie in 1..k_max={k_max}, got min {lo}, max {hi}")
    return k.to(torch.int64)


def check_code(
    values: Tensor, indices: Tensor, d_sae: int, *, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """A code ``values, indices [..., k]`` -> ``[N, k]`` values (``dtype``) and int64 indices,
    both on ``device``; indices in ``0..d_sae-1`` or -1 (masked), values finite."""
    if values.shape != indices.shape or values.ndim == 0 or values.shape[-1] == 0:
        raise InputError(
            f"values and indices must have the same shape [..., k], got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if indices.is_floating_point():
        raise InputError(f"indices must be integers, got dtype {indices.dtype}")
    k = values.shape[-1]
    idx = indices.reshape(-1, k).to(device=device, dtype=torch.int64)
    val = values.reshape(-1, k).to(device=device, dtype=dtype)  # keeps autograd (training)
    if idx.numel() and (int(idx.max()) >= d_sae or int(idx.min()) < -1):
        raise InputError(f"indices must lie in 0..d_sae-1={d_sae - 1} (or -1)")
    if not bool(torch.isfinite(val).all()):
        raise InputError("code values contain NaN or Inf")
    return val, idx
