"""The HierarchicalTopK sparse autoencoder.

One encoder pass serves every budget: ``encode(x, k)`` keeps the top-k pre-activations **sorted
descending**, so the code at budget k is the first k entries of the code at any larger budget.
``reconstruct(x, budgets)`` exploits that: one top-k at the largest budget, then prefix sums of
the gathered decoder rows give every smaller budget.

Parameters are named and oriented as SAELens does (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``) so folders convert without transposes.

Sparse codes stay ``(values, indices)`` end to end: decoding gathers k decoder rows with
``F.embedding_bag`` (or, for large CPU batches without autograd, reads each used row once per
thread: :mod:`hsae_runtime.kernels.decode_cpu`) and never builds a dense ``[N, d_sae]``
activation.

Shape vocabulary: ``N`` tokens (leading dims flattened), ``d_in``, ``d_sae``, ``k``,
``n_budgets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsae_runtime.checks import (
    check_activation_shape,
    check_budget,
    check_budgets,
    check_code,
    check_row_budgets,
)
from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import InputError
from hsae_runtime.format import TENSOR_NAMES, read_model, validate_tensors, write_model
from hsae_runtime.kernels import decode_cpu, linear_cpu
from hsae_runtime.kernels.prefix_decode import prefix_decode
from hsae_runtime.kernels.topk import masked_topk
from hsae_runtime.refine import Readout, check_readout, fit_width, refine_values


class SparseCode(NamedTuple):
    """A sorted sparse code.

    ``values [..., k]`` (descending along the last dim, ≥ 0) and ``indices [..., k]`` (int64
    latent ids). Masked tail entries (per-row budgets) have value 0 and index -1.
    """

    values: Tensor
    indices: Tensor

    def prefix(self, k: int) -> SparseCode:
        """The code at budget ``k``: the first k entries (codes are nested prefixes)."""
        if k <= 0 or k > self.values.shape[-1]:
            raise InputError(f"prefix budget must be in 1..{self.values.shape[-1]}, got {k}")
        return SparseCode(self.values[..., :k], self.indices[..., :k])


class SAE(nn.Module):
    """A TopK SAE whose code at every budget is a prefix of the code at k_max."""

    def __init__(self, config: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        kw = {"dtype": config.torch_dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(config.d_in, config.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(config.d_sae, config.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, **kw))
        self._packed_encoder: linear_cpu.PackedLinear | None = None  # see pack_for_cpu_inference
        self.readout: Readout = "encoder"  # see set_readout; a runtime choice, not in the file
        if self.W_dec.device.type != "meta":  # meta: the loader assigns the weights
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows and a tied encoder (``W_enc = W_decᵀ``), zero biases."""
        w = torch.randn(
            self.config.d_sae, self.config.d_in, generator=generator, dtype=torch.float32
        )
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------ validation
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def check_input(self, x: Tensor) -> Tensor:
        """Validate ``x [..., d_in]`` and return it flattened to ``[N, d_in]`` in the SAE dtype."""
        check_activation_shape(x, self.config.d_in)
        if not bool(torch.isfinite(x).all()):
            raise InputError("x contains NaN or Inf values")
        return x.reshape(-1, self.config.d_in).to(device=self.device, dtype=self.dtype)

    def check_budget(self, k: int) -> int:
        """``k`` if it is an int in 1..k_max (:func:`hsae_runtime.checks.check_budget`)."""
        return check_budget(k, self.config.k_max)

    def check_budgets(self, budgets: Sequence[int]) -> list[int]:
        """Non-empty budgets, each in 1..k_max, in the given order."""
        return check_budgets(budgets, self.config.k_max)

    # ------------------------------------------------------------------ encode
    def pack_for_cpu_inference(self) -> bool:
        """Pack ``W_enc`` once for fast float32 CPU inference (servers call this); True if done.

        Costs one extra copy of ``W_enc``. The pack is ignored as soon as ``W_enc``/``b_enc``
        change in place or a gradient is needed, so training is unaffected. See
        :mod:`hsae_runtime.kernels.linear_cpu`.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32 or not linear_cpu.available():
            return False
        self._packed_encoder = linear_cpu.PackedLinear(self.W_enc, self.b_enc)
        return True

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[N, d_sae]`` for an already validated ``x [N, d_in]``."""
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return linear_cpu.addmm(self.b_enc, x, self.W_enc, self._packed_encoder)

    def set_readout(self, readout: str) -> SAE:
        """Choose how :meth:`encode` sets the code's values; returns ``self``. An unknown name
        is a :class:`~hsae_runtime.errors.ConfigError` listing the readouts.

        ``encoder`` (the default, what every export computes): the pre-activations.
        ``refine``: the same latents in the same order, values refitted per token to the
        model's own prefix objective (:mod:`hsae_runtime.refine`).
        """
        self.readout = check_readout(readout)
        return self

    def encode(self, x: Tensor, k: int | Tensor) -> SparseCode:
        """Sorted top-k code of ``x [..., d_in]`` (values set by :attr:`readout`).

        ``k`` is an int (values/indices ``[..., k]``) or a per-row tensor of budgets ``[N]``
        matching the flattened leading dims (values/indices ``[..., max(k)]``, each row's tail
        past its own k masked with value 0 and index -1).
        """
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        flat = self.check_input(x)
        n = flat.shape[0]
        if isinstance(k, Tensor):
            per_row = check_row_budgets(k, n, self.config.k_max).to(self.device)
            k_top = int(per_row.max())
        else:
            per_row = None
            k_top = self.check_budget(k)
        values, indices = self.code_rows(flat, k_top, per_row)  # (N, k_top)
        return SparseCode(values.reshape(*lead, k_top), indices.reshape(*lead, k_top))

    def code_rows(self, flat: Tensor, k_top: int, per_row: Tensor | None = None) -> SparseCode:
        """The sorted code ``[N, k_top]`` of validated rows ``flat [N, d_in]`` under
        :attr:`readout`; ``per_row [N]`` masks each row past its own budget. No checks."""
        pre = self.pre_activations(flat)  # (N, d_sae)
        if self.readout == "encoder":
            return SparseCode(*masked_topk(pre, k_top, per_row))  # Triton on CUDA
        # The refit reads the code up to the last trained budget, so that a code at budget k
        # is the first k entries of one refined code whatever k was asked for.
        budgets = self.config.trained_budgets
        width = max(k_top, fit_width(budgets))
        values, indices = masked_topk(pre, width, None)  # (N, width)
        with torch.no_grad():
            values = refine_values(flat, values, indices, self.W_dec, self.b_dec, budgets)
        values, indices = values[:, :k_top], indices[:, :k_top]
        if per_row is not None:
            keep = torch.arange(k_top, device=values.device) < per_row[:, None]  # (N, k_top)
            values, indices = values.masked_fill(~keep, 0.0), indices.masked_fill(~keep, -1)
        return SparseCode(values, indices)

    def encode_for_training(self, x: Tensor, k: int) -> SparseCode:
        """:meth:`encode` for an int ``k`` with a k-sparse backward (the lean training step).

        Same values and indices as ``encode(x, k)``; gradients reach ``W_enc``/``b_enc`` only
        through the k selected latents of each token (no dense ``[N, d_sae]`` backward). See
        :mod:`hsae_runtime.sparse_encoder`.
        """
        from hsae_runtime.sparse_encoder import encode_for_training

        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        flat = self.check_input(x)
        k = self.check_budget(k)
        values, indices = encode_for_training(
            flat, self.W_enc, self.b_enc, self.b_dec, k,
            apply_b_dec=self.config.apply_b_dec_to_input,
        )
        return SparseCode(values.reshape(*lead, k), indices.reshape(*lead, k))

    # ------------------------------------------------------------------ decode
    def decode(self, code: SparseCode | tuple[Tensor, Tensor]) -> Tensor:
        """Reconstruction ``[..., d_in]`` from a sparse code ``(values, indices) [..., k]``.

        Index -1 marks a masked entry (contributes nothing). Gathers k decoder rows per token.
        """
        values, indices = code
        val, idx = check_code(  # (N, k) each
            values, indices, self.config.d_sae, device=self.device, dtype=self.dtype
        )
        lead = values.shape[:-1]
        out = self._decode_flat(val, idx)  # (N, d_in)
        return out.reshape(*lead, self.config.d_in)

    def _decode_flat(self, values: Tensor, indices: Tensor, *, bias: bool = True) -> Tensor:
        """``[N, k]`` values/indices (may hold -1) -> ``[N, d_in]``. No validation."""
        needs_grad = torch.is_grad_enabled() and (
            values.requires_grad or self.W_dec.requires_grad or self.b_dec.requires_grad
        )
        if bias and decode_cpu.worth_it(values, self.config.d_sae, needs_grad):
            return decode_cpu.decode(values, indices, self.W_dec, self.b_dec)  # batch, CPU
        masked = indices < 0
        if bool(masked.any()):
            indices = indices.masked_fill(masked, 0)
            values = values.masked_fill(masked, 0.0)
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_dec if bias else out

    def decode_dense(self, code: SparseCode) -> Tensor:
        """Reference decoder through a dense ``[N, d_sae]`` activation (tests, benchmarks)."""
        values, indices = code
        k = values.shape[-1]
        idx = indices.reshape(-1, k)
        val = values.reshape(-1, k).masked_fill(idx < 0, 0.0)
        dense = torch.zeros(idx.shape[0], self.config.d_sae, dtype=self.dtype, device=self.device)
        dense.scatter_add_(1, idx.clamp_min(0), val.to(self.dtype))
        out = dense @ self.W_dec + self.b_dec
        return out.reshape(*values.shape[:-1], self.config.d_in)

    # ------------------------------------------------------------------ multi-budget
    def reconstruct(self, x: Tensor, budgets: Sequence[int]) -> Tensor:
        """Reconstructions at several budgets from ONE encode: ``[n_budgets, ..., d_in]``.

        Output order follows ``budgets``. Uses segment sums of gathered decoder rows between
        consecutive sorted budgets, accumulated, so memory stays ``O(n_budgets · N · d_in)``.
        """
        requested = self.check_budgets(budgets)
        lead = x.shape[:-1]
        code = self.encode(x, max(requested))
        flat = SparseCode(code.values.reshape(-1, code.values.shape[-1]),
                          code.indices.reshape(-1, code.indices.shape[-1]))
        recons = self.reconstruct_from_code(flat, requested)  # (n_budgets, N, d_in)
        return recons.reshape(len(requested), *lead, self.config.d_in)

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        """``code [N, K]`` (sorted, K ≥ max(budgets)) -> ``[n_budgets, N, d_in]`` in given order."""
        values, indices = code
        return prefix_decode(values, indices, self.W_dec, self.b_dec, budgets)  # Triton on CUDA

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write the single-file model (weights + config in the safetensors metadata)."""
        write_model(path, self.config, {name: getattr(self, name) for name in TENSOR_NAMES})

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> SAE:
        """Load and validate a model file written by :meth:`save`."""
        config, tensors = read_model(path)
        return sae_from_tensors(config, tensors, source=path).to(device)


def sae_from_tensors(
    config: SAEConfig, tensors: dict[str, Tensor], *, source: str | Path = "tensors"
) -> SAE:
    """An SAE holding ``tensors`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` in ``config.dtype``,
    our orientation) after :func:`~hsae_runtime.format.validate_tensors`; no copy is made.

    ``source`` names where the tensors came from in error messages.
    """
    validate_tensors(config, tensors, source)
    sae = SAE(config, device="meta")
    sae.load_state_dict(tensors, assign=True)
    return sae


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over a batch.

    ``x [..., d_in]``, ``x_hat [..., d_in]`` or ``[n_budgets, ..., d_in]`` ->
    scalar or ``[n_budgets]``: ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` (mean over tokens).
    """
    d = x.shape[-1]
    flat = x.reshape(-1, d).double()
    denom = (flat - flat.mean(0)).pow(2).sum()
    if x_hat.shape == x.shape:
        return ((flat - x_hat.reshape(-1, d).double()).pow(2).sum() / denom).to(x.dtype)
    hat = x_hat.reshape(x_hat.shape[0], -1, d).double()
    return ((hat - flat).pow(2).sum(dim=(1, 2)) / denom).to(x.dtype)


def per_token_fvu(x: Tensor, x_hat: Tensor, center: Tensor) -> Tensor:
    """Per-token unexplained fraction ``‖x − x̂‖² / ‖x − center‖²``.

    With ``center = sae.b_dec`` (the reconstruction at budget 0) this is 1.0 for a budget that
    explains nothing and 0.0 for a perfect reconstruction. ``x [..., d_in]``,
    ``x_hat [..., d_in]`` or ``[n_budgets, ..., d_in]`` -> ``[...]`` or ``[n_budgets, ...]``.
    """
    num = (x_hat - x).pow(2).sum(-1)
    den = (x - center).pow(2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    return num / den
