"""The ``refine`` readout: refit a sorted code's values, token by token, to the SAE's own loss.

An encoder sets each value from one linear map of ``x``; the values that minimise the SAE's
training objective *for this token* are usually different (the "amortisation gap"). For a
HierarchicalTopK SAE the gap is large at the largest budgets: its encoder shrinks the tail
values, which cost it 6-25 % FVU at k = 64 against a dedicated TopK-64 SAE (``docs/pareto.md``).

This module keeps the encoder's choice **and order** of latents and replaces their values by
the least-squares solution of the model's own prefix objective on this one token::

    minimise over v [K]:  Σ_j w_j ‖x − b_dec − Σ_{i≤j} v_i e_i‖²

with ``w_j`` the weights the model was trained with (:func:`hsae_runtime.loss.prefix_weights`
over ``config.trained_budgets``: every prefix 1..k_max equally for HierarchicalTopK, the single
prefix k for a TopK-k SAE) and ``e_i`` the decoder rows of the selected latents. It is a K×K
linear system per token, ``(G ∘ M) v = N ∘ c`` with ``G = E Eᵀ``, ``c = E (x − b_dec)``,
``M_il = Σ_{j ≥ max(i,l)} w_j`` and ``N_i = Σ_{j ≥ i} w_j``; ``G ∘ M`` is positive definite
(a Schur product of two), solved by Cholesky. One solve serves every budget: the code at budget
k is still the first k entries of the refined code, so prefixes stay nested.

Codes stay non-negative: values that come out negative are fixed at 0 and the rest solved
again (active-set steps, at most 8; the first settles almost every row), then clamped. A
latent the encoder left at 0 stays at 0, and a latent the refit switches off keeps its place
in the code with value 0. Entries past the last trained budget keep the encoder's values, and
so do rows whose system cannot be factorised (e.g. a non-finite input).

Cost per token: gathering ``K`` decoder rows and ``G`` (``K² · d_in`` multiply-adds), about half
an encoder pass at K = 64, d_in = 640, d_sae = 8192. The refit exists only in the PyTorch
runtime (``SAE.set_readout("refine")``; ``hsae-runtime eval/serve/encode --readout refine``);
the exported ONNX graph, Triton repository and SAELens folder compute the encoder readout.

Shapes: ``N`` tokens, ``K`` code width, ``d`` = d_in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from hsae_runtime.errors import ConfigError
from hsae_runtime.loss import prefix_weights

Readout = Literal["encoder", "refine"]
"""How a code's values are set: ``encoder`` (the SAE's pre-activations, what every export
computes) or ``refine`` (the per-token refit of this module)."""

READOUTS: tuple[str, ...] = get_args(Readout)

_CHUNK_ELEMENTS = 1 << 20
"""Gathered decoder rows held at once (``rows · K · d``): 4 MiB of float32, so that a chunk's
rows stay in cache from the gather to the Gram product (1.8x faster than 32 MiB chunks at
K = 64, d = 640; 0.5 MiB chunks are slower again)."""

_ACTIVE_SET_STEPS = 8
"""Most re-solves after pinning negative values at 0; a value still negative then is clamped."""

_RIDGE = 1e-6
"""Relative ridge on the system's diagonal: keeps near-parallel decoder rows solvable."""


def check_readout(readout: object) -> Readout:
    """``readout`` if it names a readout, else :class:`ConfigError` listing them."""
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}",
                          hint=f"choose one of {', '.join(READOUTS)}")
    return readout  # type: ignore[return-value]


def fit_width(budgets: Sequence[int]) -> int:
    """How many leading code entries the refit sets: the largest trained budget."""
    return max(int(b) for b in budgets)


def prefix_masses(budgets: Sequence[int], k: int) -> tuple[Tensor, Tensor]:
    """``M [k, k]`` and ``N [k]`` (float64) of the system above for a code of width ``k``.

    ``N_i`` is the total weight of the trained prefixes that contain rank ``i`` and ``M_il``
    that of those containing both ranks, so ``M_ii = N_i``.
    """
    w = prefix_weights(k, budgets, n=1, d=1)  # (k,), sums to 1
    tail = w.flip(0).cumsum(0).flip(0)  # (k,): N_i = Σ_{j ≥ i} w_j
    ranks = torch.arange(k)
    return tail[torch.maximum(ranks[:, None], ranks[None, :])], tail


def refine_values(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                  budgets: Sequence[int]) -> Tensor:
    """Refit ``values [N, K]`` of a sorted code of ``x [N, d]`` to the prefix objective.

    ``indices [N, K]`` (−1 = masked, stays 0), ``W_dec [d_sae, d]``, ``b_dec [d]``. Only the
    first ``min(K, max(budgets))`` entries change; the result is ``[N, K]`` in ``values``' dtype,
    non-negative. No autograd through the solve is intended (call it under ``no_grad``).
    """
    n, k = values.shape
    k_fit = min(k, fit_width(budgets))
    pair, rank = prefix_masses([b for b in budgets if b <= k_fit] or [k_fit], k_fit)
    pair = pair.to(x.device, torch.float32)  # (K, K): M above
    rank = rank.to(x.device, torch.float32)  # (K,): N above
    out = values.clone()
    rows = max(1, _CHUNK_ELEMENTS // max(1, k_fit * x.shape[-1]))
    for s in range(0, n, rows):
        sl = slice(s, s + rows)
        out[sl, :k_fit] = _refit(
            x[sl].float(), values[sl, :k_fit].float(), indices[sl, :k_fit], W_dec, b_dec, pair,
            rank,
        ).to(values.dtype)
    return out


def _refit(x: Tensor, v: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor, pair: Tensor,
           rank: Tensor) -> Tensor:
    """One chunk: ``x [n, d]``, ``v``/``idx [n, K]`` -> refined ``[n, K]`` float32."""
    live = (idx >= 0) & (v > 0)  # (n, K): entries the refit may set
    E = W_dec[idx.clamp_min(0)].float() * live[..., None]  # (n, K, d)
    G = E @ E.transpose(1, 2)  # (n, K, K)
    c = (E @ (x - b_dec.float())[..., None])[..., 0]  # (n, K)
    A = G * pair  # (n, K, K)
    b = c * rank  # (n, K)
    sol = _solve(A, b, live)
    failed = ~torch.isfinite(sol).all(-1)  # (n,): these rows keep the encoder's values
    # Active-set steps: what came out negative is fixed at 0 and the rest solved again, for
    # the rows that changed, until none does (the first step settles almost every row).
    for _ in range(_ACTIVE_SET_STEPS):
        shrunk = live & (sol > 0)
        again = (shrunk != live).any(-1) & ~failed  # (n,)
        if not bool(again.any()):
            break
        live[again] = shrunk[again]
        sol[again] = _solve(A[again], b[again], live[again])
        failed |= ~torch.isfinite(sol).all(-1)
    return torch.where(failed[:, None], v, sol.clamp_min(0.0))


def _solve(A: Tensor, b: Tensor, live: Tensor) -> Tensor:
    """``A [n, K, K] x = b [n, K]`` on the ``live`` entries (others pinned to 0); NaN rows where
    the restricted system is not positive definite."""
    pin = ~live
    both = live[:, :, None] & live[:, None, :]  # (n, K, K)
    diag = torch.diagonal(A, dim1=1, dim2=2)  # (n, K)
    scale = (diag * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    ridge = _RIDGE * scale.clamp_min(torch.finfo(A.dtype).tiny)  # (n, 1)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    A = torch.where(both, A, 0.0) + eye * torch.where(pin, 1.0, ridge)[:, None, :]
    b = torch.where(live, b, 0.0)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b[..., None], L)[..., 0]  # (n, K)
    return torch.where((info == 0)[:, None], x, torch.nan)
