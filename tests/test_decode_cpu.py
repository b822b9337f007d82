"""The latent-major CPU decode: equal to the embedding_bag decode, masks, dispatch rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.kernels import decode_cpu

pytest.importorskip("numba")


def _reference(values, indices, W, b):
    masked = indices < 0
    return F.embedding_bag(indices.masked_fill(masked, 0), W,
                           per_sample_weights=values.masked_fill(masked, 0.0), mode="sum") + b


@pytest.mark.parametrize(("n", "k", "d_sae", "d_in"), [(1, 3, 7, 5), (37, 16, 300, 96),
                                                       (130, 24, 200, 70)])
def test_matches_embedding_bag_with_masked_entries(n, k, d_sae, d_in):
    g = torch.Generator().manual_seed(n)
    W, b = torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g)
    indices = torch.randint(0, d_sae, (n, k), generator=g)
    indices[:, k // 2:][torch.rand(n, k - k // 2, generator=g) < 0.3] = -1  # masked tails
    values = torch.rand(n, k, generator=g)
    got = decode_cpu.decode(values, indices, W, b)
    torch.testing.assert_close(got, _reference(values, indices, W, b), rtol=1e-5, atol=1e-5)


def test_sae_decode_dispatch_and_autograd(monkeypatch):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=48, d_sae=64, k_max=8))
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(40, 48)
    calls = []
    real = decode_cpu.decode
    monkeypatch.setattr(decode_cpu, "decode", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        code = sae.encode(x, 8)  # 40 * 8 >= 64: the latent-major kernel
        fast = sae.decode(code)
        assert calls == [1]
        torch.testing.assert_close(fast, sae.decode_dense(code), rtol=1e-5, atol=1e-5)
        sae.decode((code.values[:3], code.indices[:3]))  # 3 * 8 < 64: embedding_bag
        assert calls == [1]
    # With autograd the kernel is never used and gradients reach W_dec.
    code = sae.encode(x, 8)
    sae.decode(code).pow(2).sum().backward()
    assert calls == [1] and sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
