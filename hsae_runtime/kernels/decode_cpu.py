"""Latent-major sparse decode on the CPU (numba): each decoder row is read once per thread.

``decode(values [N, k], indices [N, k], W_dec [d_sae, d_in], b_dec [d_in]) -> [N, d_in]``,
``b_dec + Σ_j values[:, j] · W_dec[indices[:, j]]``; index -1 contributes nothing.

``F.embedding_bag`` gathers k rows *per token*: ``N · k · d_in`` floats from memory. In a batch
the same latents fire for many tokens (at N = 1024, k = 64, d_sae = 16384 each row is wanted
~4 times), and ``W_dec`` (151 MB for Gemma-2-2B's width) does not fit in cache, so every repeat
is another trip to DRAM. Here each thread takes a contiguous slice of the tokens, groups its
entries by latent (a counting sort, :func:`.encoder_cpu.group_by_latent`), and for every latent
it needs reads the row once and adds it, scaled, into each of its tokens' outputs. Tokens are
split between threads (not latents), so outputs never race. It wins only when rows are reused
(``benchmarks/bench_decode.py``; numbers in ``docs/benchmarks-core.md``), so :func:`worth_it`
picks it only when rows are reused on average.

No autograd: :class:`~hsae_runtime.sae.SAE` uses it only when no gradient is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.kernels import encoder_cpu

try:  # optional at import time, like encoder_cpu
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


def worth_it(values: Tensor, d_sae: int, needs_grad: bool) -> bool:
    """Use the kernel for float32 CPU codes ``[N, k]`` whose N·k reaches d_sae (row reuse ≥ 1)."""
    return (
        numba is not None
        and not needs_grad
        and values.device.type == "cpu"
        and values.dtype == torch.float32
        and values.ndim == 2
        and values.shape[0] * values.shape[1] >= d_sae
    )


if numba is not None:
    group_by_latent = encoder_cpu.group_by_latent

    @njit(parallel=True, fastmath=True, cache=True)
    def _decode(indices, values, W, b, n_parts, out):  # pragma: no cover - jitted
        n, k = indices.shape
        d_sae, d = W.shape
        for part in prange(n_parts):
            t0 = n * part // n_parts
            t1 = n * (part + 1) // n_parts
            offsets = np.empty(d_sae + 1, dtype=np.int64)
            tok = np.empty((t1 - t0) * k, dtype=np.int64)
            coef = np.empty((t1 - t0) * k, dtype=values.dtype)
            group_by_latent(indices, values, d_sae, t0, t1, offsets, tok, coef)
            for t in range(t0, t1):
                row = out[t]
                for c in range(d):
                    row[c] = b[c]
            for lat in range(d_sae):
                start = offsets[lat]
                end = offsets[lat + 1]
                if start == end:
                    continue
                w = W[lat]  # read once, added into every token of this slice that uses it
                for p in range(start, end):
                    row = out[tok[p]]
                    v = coef[p]
                    for c in range(d):
                        row[c] += v * w[c]


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``values/indices [N, k]`` (index -1 = masked) -> ``b_dec + Σ v·W_dec[idx]`` ``[N, d_in]``."""
    assert numba is not None
    n = values.shape[0]
    W = W_dec.detach().contiguous()
    out = torch.empty(n, W.shape[1], dtype=W.dtype)
    if n == 0:
        return out
    n_parts = max(1, min(numba.get_num_threads(), n))
    _decode(
        indices.detach().to(torch.int64).contiguous().numpy(),
        values.detach().to(W.dtype).contiguous().numpy(),
        W.numpy(),
        b_dec.detach().to(W.dtype).contiguous().numpy(),
        n_parts,
        out.numpy(),
    )
    return out
