"""Fused CPU kernels (numba) for the HierarchicalTopK loss: the fast path on CPU.

The loss is a weighted sum over prefixes j of ``‖r_j‖²`` with ``r_j = x − b − Σ_{i≤j} v_i e_i``
(``e_i = W[idx_i]``). Both passes touch every gathered decoder row once, which is the same
memory traffic as a plain TopK loss through ``embedding_bag``:

* forward, parallel over tokens: a running residual ``r`` (one row, stays in L1) loses
  ``v_j e_j`` per step and adds ``c_j ‖r‖²``; the final residual ``r_K`` is kept for the backward;
* backward, walking prefixes in reverse: ``g_j = g_{j+1} + 2 c_j r_j`` (suffix sum of residual
  gradients), ``dv_j = −<g_j, e_j>``, ``dW[idx_j] −= v_j g_j``, then ``r_{j−1} = r_j + v_j e_j``.

The backward scatters into ``dW`` rows chosen by the data, so token-parallel threads would race.
We split the *columns* of ``d_in`` between threads instead: each thread owns a slice of every
row of ``dW``, walks all tokens, and writes partial dot products ``dv`` that are summed after.
No locks, no atomics, no ``[N, K, d_in]`` buffer, deterministic results.

numba is optional: :func:`available` says whether this module can run; the loss falls back to
the pure-torch memory-flat implementation otherwise. Kernels compile on first use (a few
seconds, cached on disk afterwards).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # optional dependency
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

_SUPPORTED = (torch.float32, torch.float64)
# Column slices start on a 64-byte boundary so two threads never share a cache line of dW.
_ALIGN = 16


def available() -> bool:
    """True when numba imports (the kernels compile lazily on first call)."""
    return numba is not None


def supports(x: Tensor) -> bool:
    return available() and x.device.type == "cpu" and x.dtype in _SUPPORTED


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True)
    def _forward(x, values, indices, W, b, coef, R, loss_tok):  # pragma: no cover - jitted
        n_tok, k = values.shape
        d = x.shape[1]
        for n in prange(n_tok):
            r = R[n]
            for i in range(d):
                r[i] = x[n, i] - b[i]
            sq = 0.0  # ‖r‖² of the current residual, reused when an entry is masked
            for i in range(d):
                sq += r[i] * r[i]
            acc = 0.0
            for j in range(k):
                lat = indices[n, j]
                if lat >= 0:
                    v = values[n, j]
                    e = W[lat]
                    s = 0.0
                    for i in range(d):
                        t = r[i] - v * e[i]
                        r[i] = t
                        s += t * t
                    sq = s
                acc += coef[j] * sq
            loss_tok[n] = acc

    @njit(parallel=True, fastmath=True, cache=True)
    def _backward(R, values, indices, W, coef2, bounds, dW, G1, dv_part):  # pragma: no cover
        n_tok, k = values.shape
        n_slices = bounds.shape[0] - 1
        for s in prange(n_slices):
            lo = bounds[s]
            hi = bounds[s + 1]
            width = hi - lo
            r = np.empty(width, dtype=R.dtype)
            g = np.empty(width, dtype=R.dtype)
            zero = np.zeros(1, dtype=R.dtype)[0]  # accumulate dots in the data dtype
            for n in range(n_tok):
                r[:] = R[n, lo:hi]
                g[:] = 0.0
                for j in range(k - 1, -1, -1):
                    c = coef2[j]
                    if c != 0.0:
                        for i in range(width):
                            g[i] += c * r[i]
                    lat = indices[n, j]
                    if lat < 0:
                        dv_part[s, n, j] = 0.0
                        continue
                    v = values[n, j]
                    e = W[lat, lo:hi]
                    dw = dW[lat, lo:hi]
                    # three simple loops, because they vectorise better than one fused loop
                    dot = zero
                    for i in range(width):
                        dot += g[i] * e[i]
                    for i in range(width):
                        dw[i] -= v * g[i]
                    for i in range(width):
                        r[i] += v * e[i]
                    dv_part[s, n, j] = -dot
                G1[n, lo:hi] = g


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _column_bounds(d: int, n_slices: int) -> np.ndarray:
    step = -(-d // n_slices)
    step = -(-step // _ALIGN) * _ALIGN
    cuts = list(range(0, d, step)) + [d]
    return np.asarray(cuts, dtype=np.int64)


def forward(
    x: Tensor, values: Tensor, indices: Tensor, W: Tensor, b: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """Loss and final residual.

    ``x [N, d_in]``, ``values/indices [N, K]``, ``W [d_sae, d_in]``, ``b [d_in]``, ``coef [K]``
    (float64 prefix weights) -> ``(loss [] float64, R [N, d_in])`` with ``R = r_K``.
    """
    assert numba is not None
    n, d = x.shape
    R = torch.empty(n, d, dtype=x.dtype)
    loss_tok = torch.empty(n, dtype=torch.float64)
    _forward(
        _np(x), _np(values), _np(indices), _np(W), _np(b), _np(coef), R.numpy(), loss_tok.numpy()
    )
    return loss_tok.sum(), R


def backward(
    R: Tensor, values: Tensor, indices: Tensor, W: Tensor, coef2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``coef2 = 2 · coef · grad_out`` (``[K]``, same dtype as ``R``).

    Returns ``dv [N, K]``, ``dW [d_sae, d_in]`` and ``G1 [N, d_in]`` (= dL/dx = −dL/db per
    token).
    """
    assert numba is not None
    n, d = R.shape
    n_threads = max(1, min(numba.get_num_threads(), torch.get_num_threads()))
    bounds = _column_bounds(d, n_threads)
    n_slices = len(bounds) - 1
    dW = torch.zeros_like(W)
    G1 = torch.empty_like(R)
    dv_part = torch.empty(n_slices, *values.shape, dtype=values.dtype)
    _backward(
        _np(R), _np(values), _np(indices), _np(W), _np(coef2), bounds,
        dW.numpy(), G1.numpy(), dv_part.numpy(),
    )
    dv = dv_part[0] if n_slices == 1 else dv_part.sum(0)
    return dv, dW, G1
