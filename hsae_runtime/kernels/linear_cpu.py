"""Encoder GEMM for CPU inference with a prepacked weight (oneDNN, through torch's mkldnn ops).

``torch.addmm`` on the CPU calls MKL's sgemm. For the batch sizes a server sees it is slow on
the AMD EPYC (AVX2) machines this project is measured on: ``x [16, 2304] @ W_enc [2304, 16384]``
takes ~51 ms, barely less than sixteen one-row products (16 × ~7 ms), because the library packs
all of ``W_enc`` (151 MB) on every call. oneDNN can pack the weight **once** into its blocked
layout; the same product then takes ~13-16 ms, one row ~5 ms, 256 rows ~150 ms instead of
~225 ms (``benchmarks/bench_serving.py`` prints the in-process effect). That is what makes
dynamic batching of single-row requests pay off.

The packed weight is an inference cache: :class:`PackedLinear` remembers the version counter of
the weight it was built from and refuses (returns ``None``) once the weight has changed, so a
trained-then-served SAE never uses stale weights. It costs one extra copy of ``W_enc``.

``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise`` are the ops torch's own
inductor uses for frozen CPU linears; they are private, so :func:`available` checks for them and
every caller falls back to ``torch.addmm`` without them (tests cover both paths).

Shapes: ``x [N, d_in]``, ``W [d_in, d_out]`` (SAELens orientation), ``b [d_out]`` -> ``[N, d_out]``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BATCH_HINT = 16  # oneDNN picks its blocking for this batch size; 1..1024 all measured within 10 %
EXACT_ROWS = 16
"""Row counts up to this run as they are; larger ones are rounded up by :func:`bucket_rows`."""


def available() -> bool:
    """True when this torch build has oneDNN and the packed-linear ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and ops is not None
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic builds
        return False


class PackedLinear:
    """``b + x @ W`` with ``W [d_in, d_out]`` packed once for float32 CPU inference."""

    def __init__(self, W: Tensor, b: Tensor) -> None:
        if W.device.type != "cpu" or W.dtype != torch.float32:
            raise ValueError(
                f"PackedLinear needs a float32 CPU weight, got {W.dtype} on {W.device}"
            )
        self._W, self._b = W, b
        self._versions = (W._version, b._version)
        with torch.no_grad():
            # [d_out, d_in] view of the SAELens-oriented weight; oneDNN copies it into its layout.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(W.detach().t(), BATCH_HINT)
            self._bias = b.detach().clone()

    def is_current(self, W: Tensor, b: Tensor) -> bool:
        """Was this pack built from exactly these tensors, unmodified since?"""
        return (W is self._W and b is self._b
                and (W._version, b._version) == self._versions)

    def __call__(self, x: Tensor) -> Tensor:
        """``x [N, d_in]`` float32 -> ``[N, d_out]``, computed for :func:`bucket_rows` rows.

        oneDNN and torch's ideep layer above it each cache a primitive per input shape, each
        entry holding memory, up to 1024 entries per cache: a server whose batches have every
        row count from 1 to a few hundred (text and token traffic) grew its heap until both
        caches were full (docs/serving.md). Zero rows pad ``x`` to one of a few row counts
        instead (at most 12.5 % extra rows), so the caches stay small and warm.
        """
        n = x.shape[0]
        rows = bucket_rows(n)
        if rows != n:
            x = torch.cat([x, x.new_zeros(rows - n, x.shape[1])])  # (rows, d_in)
        out = _linear(x.contiguous(), self._packed, self._bias)  # (rows, d_out)
        return out if rows == n else out[:n]


def bucket_rows(n: int) -> int:
    """``n`` up to :data:`EXACT_ROWS`, else ``n`` rounded up to a multiple of 1/8 of the power
    of two below it (8 row counts per doubling): 17 -> 18, 100 -> 104, 1000 -> 1024."""
    if n <= EXACT_ROWS:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _linear(x: Tensor, packed: Tensor, bias: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def addmm(b: Tensor, x: Tensor, W: Tensor, packed: PackedLinear | None) -> Tensor:
    """``b + x @ W`` through ``packed`` when it is current and usable, else ``torch.addmm``."""
    needs_grad = torch.is_grad_enabled() and (W.requires_grad or b.requires_grad or x.requires_grad)
    if (
        packed is not None
        and not needs_grad
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and packed.is_current(W, b)
    ):
        return packed(x)
    return torch.addmm(b, x, W)
