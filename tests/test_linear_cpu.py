"""The packed CPU encoder GEMM: same numbers as ``torch.addmm``, never stale, never in autograd."""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.kernels import linear_cpu

needs_onednn = pytest.mark.skipif(not linear_cpu.available(), reason="torch built without oneDNN")


def _sae(seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=96, d_sae=320, k_max=16))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae


@needs_onednn
@pytest.mark.parametrize("n", [1, 3, 16, 130])
def test_packed_matches_addmm(n: int) -> None:
    W, b = torch.randn(96, 320), torch.randn(320)
    x = torch.randn(n, 96)
    packed = linear_cpu.PackedLinear(W, b)
    torch.testing.assert_close(linear_cpu.addmm(b, x, W, packed), torch.addmm(b, x, W),
                               rtol=1e-5, atol=1e-4)


@needs_onednn
def test_pack_goes_stale_after_an_in_place_update() -> None:
    W, b = torch.randn(96, 320), torch.randn(320)
    packed = linear_cpu.PackedLinear(W, b)
    assert packed.is_current(W, b)
    W.mul_(2.0)  # an optimizer step does the same
    assert not packed.is_current(W, b)
    x = torch.randn(4, 96)
    torch.testing.assert_close(linear_cpu.addmm(b, x, W, packed), torch.addmm(b, x, W))
    assert not packed.is_current(W.clone(), b)  # another tensor, even with equal values


@needs_onednn
def test_sae_encode_with_pack_equals_unpacked() -> None:
    sae = _sae()
    x = torch.randn(2, 5, 96)
    with torch.inference_mode():
        plain = sae.encode(x, 16)
    assert sae.pack_for_cpu_inference()
    with torch.inference_mode():
        fast = sae.encode(x, 16)
    torch.testing.assert_close(fast.values, plain.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.indices, plain.indices)
    # Training after packing: the pack is bypassed when a gradient is needed...
    code = sae.encode(x, 4)
    assert code.values.requires_grad
    # ...and stale after the weights change.
    with torch.no_grad():
        sae.W_enc.add_(0.5)
    with torch.inference_mode():
        moved = sae.encode(x, 16)
        flat = x.reshape(-1, 96) - sae.b_dec
        ref = torch.topk(torch.addmm(sae.b_enc, flat, sae.W_enc), 16).values.relu()
    torch.testing.assert_close(moved.values.reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)


def test_without_onednn_everything_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_cpu, "available", lambda: False)
    sae = _sae()
    assert not sae.pack_for_cpu_inference()
    x = torch.randn(3, 96)
    with torch.inference_mode():
        code = sae.encode(x, 8)
    assert code.values.shape == (3, 8)


def test_pack_refuses_non_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        linear_cpu.PackedLinear(torch.randn(4, 8, dtype=torch.float64), torch.randn(8))
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k_max=4, dtype="bfloat16"))
    assert not sae.pack_for_cpu_inference()


@needs_onednn
def test_packed_gemm_runs_a_few_row_counts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN keeps a primitive (and memory) per input shape: every row count 1..600 must map
    # onto a few shapes, with the same numbers as an unpadded product.
    W, b = torch.randn(96, 320), torch.randn(320)
    packed = linear_cpu.PackedLinear(W, b)
    shapes: set[int] = set()
    real = linear_cpu._linear

    def spy(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        shapes.add(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(linear_cpu, "_linear", spy)
    for n in range(1, 601):
        x = torch.randn(n, 96)
        out = packed(x)
        assert out.shape == (n, 320)
        if n in (1, 17, 100, 333, 600):
            torch.testing.assert_close(out, torch.addmm(b, x, W), rtol=1e-5, atol=1e-4)
    assert len(shapes) <= 16 + 8 * 6  # exact up to 16 rows, then 8 per doubling
    assert all(linear_cpu.bucket_rows(n) - n <= n // 8 for n in range(1, 10_000))
