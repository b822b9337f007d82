"""Steering: interventions on a sparse code at a budget, and the activation they splice in.

An :class:`Intervention` changes one latent of the code at budget ``k``:

* ``set``   - the latent takes ``value``; a latent outside the top-k is added to the code;
* ``scale`` - the latent's value in the budget-k code is multiplied by ``value`` (a latent
  outside the top-k has value 0 there and stays 0);
* ``ablate`` - the latent's value becomes 0.

With ``condition`` set, the intervention acts only on tokens where that latent fires (is in
the budget-k code with a positive value) - steering that triggers on a concept.

:func:`steer_activations` turns activations ``x [N, d_in]`` into what the LM sees instead:
the reconstruction of the intervened code, plus the SAE's error term ``x - x_hat`` when
``keep_error`` is set (then an empty intervention list gives back ``x`` up to rounding, and
only the interventions change the LM's output). Codes stay ``(values, indices)``: interventions
that add a latent append columns to the code (index -1 where they do not apply), and no dense
``[N, d_sae]`` tensor is built.

The SAE is anything with ``config`` (``d_sae``, ``k_max``), ``encode(x, k)`` and
``reconstruct_from_code(code, budgets)``: :class:`~hsae_runtime.sae.SAE` or a serving backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from hsae_runtime import checks
from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import InputError
from hsae_runtime.sae import SparseCode

Op = Literal["set", "scale", "ablate"]
OPS: tuple[Op, ...] = ("set", "scale", "ablate")
_OP_CODE = {"set": 1, "scale": 2, "ablate": 3}


class SteerableSAE(Protocol):
    """What steering needs from an SAE (``N`` rows, ``k``, ``n_budgets``)."""

    config: SAEConfig

    def encode(self, x: Tensor, k: int) -> SparseCode:
        """``x [N, d_in]`` -> sorted code ``[N, k]``."""
        ...

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        """``code [N, K]`` (indices may hold -1) -> ``[n_budgets, N, d_in]``."""
        ...


@dataclass(frozen=True)
class Intervention:
    """One change to one latent of the code (see the module docstring for the ops)."""

    latent: int
    """The latent id, in ``0 .. d_sae - 1``."""
    op: Op = "set"
    """``set``, ``scale`` or ``ablate``."""
    value: float = 0.0
    """The value to set, or the factor to scale by (ignored by ``ablate``)."""
    condition: int | None = None
    """Act only on tokens where this latent fires (``None``: on every token)."""


class SteerSpec(NamedTuple):
    """What one sequence asks for: budget ``k``, its interventions, whether to keep the error."""

    budget: int
    interventions: tuple[Intervention, ...] = ()
    keep_error: bool = True


def check_budget(config: SAEConfig, budget: Any) -> int:
    """``budget`` as an int in ``1..k_max``, else :class:`InputError`
    (:func:`hsae_runtime.checks.check_budget`)."""
    return checks.check_budget(budget, config.k_max)


def check_interventions(config: SAEConfig, interventions: Sequence[Intervention]) -> None:
    """Raise :class:`InputError` for an unknown op, a latent outside ``0..d_sae-1`` (the
    intervened one or its condition), a latent with two interventions or a value that is NaN
    or infinite."""
    last = config.d_sae - 1
    seen: set[int] = set()
    for i, iv in enumerate(interventions):
        if iv.op not in OPS:
            raise InputError(
                f"intervention {i}: unknown op {iv.op!r}", hint=f"use one of {', '.join(OPS)}"
            )
        for what, latent in (("latent", iv.latent), ("condition latent", iv.condition)):
            if latent is None and what != "latent":
                continue
            if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent <= last:
                raise InputError(
                    f"intervention {i}: {what} {latent!r} is not a latent id",
                    hint=f"this SAE has d_sae={config.d_sae} latents: ids 0..{last}",
                )
        if iv.latent in seen:
            raise InputError(
                f"intervention {i}: latent {iv.latent} already has an intervention",
                hint="give each latent at most one of set / scale / ablate",
            )
        seen.add(iv.latent)
        if not math.isfinite(float(iv.value)):
            raise InputError(
                f"intervention {i} on latent {iv.latent}: value {iv.value} is not finite",
                hint="give a finite number (a clamp value or a scale factor)",
            )


def parse_intervention(text: str, op: Op) -> Intervention:
    """``"1883=40"`` (set / scale) or ``"12"`` (ablate) -> :class:`Intervention` (CLI form)."""
    latent_text, _, value_text = text.partition("=")
    try:
        latent = int(latent_text)
        value = float(value_text) if value_text else 0.0
    except ValueError:
        raise InputError(
            f"cannot read intervention {text!r}",
            hint="write LATENT=VALUE for --clamp / --scale and LATENT for --ablate",
        ) from None
    if op != "ablate" and not value_text:
        raise InputError(f"--{'clamp' if op == 'set' else op} {text!r} needs a value: LATENT=VALUE")
    return Intervention(latent, op, value)


def _intervention_table(
    rows: Sequence[tuple[Intervention, ...]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Per-row padded ``latent, op, value, condition`` tables ``[R, M]`` (op 0 = none)."""
    m = max((len(r) for r in rows), default=0)
    if m == 0:
        return None
    latent = torch.zeros(len(rows), m, dtype=torch.int64)
    op = torch.zeros(len(rows), m, dtype=torch.int64)
    value = torch.zeros(len(rows), m, dtype=torch.float32)
    cond = torch.full((len(rows), m), -1, dtype=torch.int64)
    for r, ivs in enumerate(rows):
        for j, iv in enumerate(ivs):
            latent[r, j], op[r, j], value[r, j] = iv.latent, _OP_CODE[iv.op], float(iv.value)
            cond[r, j] = -1 if iv.condition is None else iv.condition
    return latent.to(device), op.to(device), value.to(device), cond.to(device)


def apply_interventions(
    code: SparseCode, rows: Sequence[tuple[Intervention, ...]], row_of: Tensor
) -> SparseCode:
    """Apply each token's interventions to its code.

    ``code [N, k]`` (indices may hold -1), ``rows[r]`` the interventions of sequence ``r``,
    ``row_of [N]`` the sequence of each token. Returns ``[N, k + M]`` (``M`` = most
    interventions of one sequence): the first ``k`` columns are the code with ``set`` /
    ``scale`` / ``ablate`` applied, the rest the ``set`` latents that were not in the code
    (index -1 where a column does not apply). Each latent has at most one intervention
    (:func:`check_interventions`).
    """
    values, indices = code
    table = _intervention_table(rows, values.device)
    if table is None:
        return code
    latent, op, value, cond = (t[row_of] for t in table)  # (N, M) each
    fires = (indices[:, :, None] == cond[:, None, :]) & (values[:, :, None] > 0)  # (N, k, M)
    active = (op > 0) & ((cond < 0) | fires.any(dim=1))  # (N, M)
    values = values.clone()
    added_val = torch.zeros_like(value)
    added_idx = torch.full_like(latent, -1)
    for j in range(latent.shape[1]):
        hit = (indices == latent[:, j : j + 1]) & active[:, j : j + 1]  # (N, k)
        v = value[:, j : j + 1].to(values.dtype)
        o = op[:, j : j + 1]
        new = torch.where(o == 1, v, torch.where(o == 2, values * v, torch.zeros_like(values)))
        values = torch.where(hit, new, values)
        add = active[:, j] & (op[:, j] == 1) & ~hit.any(dim=1)  # a set latent outside the code
        added_idx[:, j] = torch.where(add, latent[:, j], -1)
        added_val[:, j] = torch.where(add, value[:, j], 0.0)
    return SparseCode(
        torch.cat([values, added_val.to(values.dtype)], dim=1), torch.cat([indices, added_idx], 1)
    )


class Steered(NamedTuple):
    """:func:`steer_activations`' result for ``N`` tokens."""

    activations: Tensor
    """``[N, d_in]``: what the LM sees at the hookpoint."""
    code: SparseCode
    """``[N, k + M]``: the intervened code (index -1 = empty entry)."""


def steer_activations(
    sae: SteerableSAE, x: Tensor, specs: Sequence[SteerSpec], row_of: Tensor
) -> Steered:
    """Replace ``x [N, d_in]`` by the reconstruction of its steered budget-k code.

    ``specs[r]`` says what sequence ``r`` asks for, ``row_of [N]`` (int64) which sequence each
    token belongs to. Every token is encoded once at the largest budget asked; each keeps its
    own sequence's prefix.
    """
    k_top = max(s.budget for s in specs)
    code = sae.encode(x, k_top)  # (N, k_top)
    budgets = torch.tensor([s.budget for s in specs], device=code.indices.device)[row_of]
    outside = torch.arange(k_top, device=budgets.device)[None, :] >= budgets[:, None]  # (N, k)
    code = SparseCode(code.values.masked_fill(outside, 0.0), code.indices.masked_fill(outside, -1))
    steered = apply_interventions(code, [s.interventions for s in specs], row_of)
    width = steered.values.shape[1]
    out = sae.reconstruct_from_code(steered, [width])[0].to(x.dtype)  # (N, d_in)
    keep = torch.tensor([s.keep_error for s in specs], device=x.device)[row_of.to(x.device)]
    if bool(keep.any()):
        recon = sae.reconstruct_from_code(code, [k_top])[0].to(x.dtype)  # (N, d_in)
        out = torch.where(keep[:, None], out + (x - recon), out)
    return Steered(out, steered)
