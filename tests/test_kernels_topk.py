"""Triton top-k and prefix-decode kernels vs their torch references (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are first defined (they are built lazily on first use).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hsae_runtime.kernels.prefix_decode import (  # noqa: E402
    prefix_decode,
    prefix_decode_reference,
    prefix_decode_triton,
)
from hsae_runtime.kernels.topk import (  # noqa: E402
    masked_topk,
    masked_topk_reference,
    masked_topk_triton,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton cannot be imported here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("n", "d_sae", "k_top", "block"), [
    (3, 300, 7, 128),    # k not a power of two, d_sae not a multiple of the block
    (2, 256, 16, 256),   # a single block
    (2, 500, 33, 256),   # K_PAD 64 > k
    (1, 40, 40, 16),     # k == d_sae (block grows to K_PAD)
    (4, 300, 1, 128),    # k = 1: K_PAD is 2 (tl.topk(x, 1) does not compile on CUDA)
    (2, 300, 2, 128),
])
def test_topk_matches_reference(n, d_sae, k_top, block):
    pre = torch.randn(n, d_sae, device=DEVICE)
    k_rows = torch.randint(1, k_top + 1, (n,), device=DEVICE)
    for rows in (None, k_rows) if k_top < 30 else (k_rows,):
        got_v, got_i = masked_topk_triton(pre, k_top, rows, block=block)
        ref_v, ref_i = masked_topk_reference(pre, k_top, rows)
        torch.testing.assert_close(got_v, ref_v)
        torch.testing.assert_close(got_i, ref_i)  # random floats: no ties


def test_topk_negative_values_ties_and_half():
    pre = -torch.rand(2, 100, device=DEVICE)  # all negative: ReLU zeroes, order still by value
    pre[1, 10] = pre[1, 20] = 5.0  # a tie: the lower id comes first
    v, i = masked_topk_triton(pre, 4, block=32)
    rv, ri = masked_topk_reference(pre, 4)
    torch.testing.assert_close(v, rv)
    assert i[0].tolist() == ri[0].tolist() and i[1, :2].tolist() == [10, 20]
    half = torch.randn(3, 100, device=DEVICE).half()
    hv, hi = masked_topk_triton(half, 5, torch.tensor([1, 5, 3], device=DEVICE), block=64)
    rv, ri = masked_topk_reference(half, 5, torch.tensor([1, 5, 3], device=DEVICE))
    assert hv.dtype == torch.float16
    torch.testing.assert_close(hv, rv)
    torch.testing.assert_close(hi, ri)


@pytest.mark.parametrize(("n", "k", "d_in", "budgets"), [
    (4, 9, 40, [9, 2, 5]),    # unsorted budgets, d_in not a multiple of the block
    (2, 16, 64, [16]),
    (3, 5, 10, [1, 2, 3, 4, 5]),
])
def test_prefix_decode_matches_reference(n, k, d_in, budgets):
    d_sae = 50
    W_dec = torch.randn(d_sae, d_in, device=DEVICE)
    b_dec = torch.randn(d_in, device=DEVICE)
    values = torch.rand(n, k, device=DEVICE).sort(dim=1, descending=True).values
    indices = torch.randint(0, d_sae, (n, k), device=DEVICE)
    indices[0, -2:] = -1  # a masked tail
    values[0, -2:] = 0.0
    got = prefix_decode_triton(values, indices, W_dec, b_dec, budgets, block_d=16)
    ref = prefix_decode_reference(values, indices, W_dec, b_dec, budgets)
    assert got.shape == (len(budgets), n, d_in)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dispatch_uses_reference_on_cpu_and_with_grad():
    pre = torch.randn(3, 50, requires_grad=True)
    v, _ = masked_topk(pre, 4)
    v.sum().backward()  # the reference path keeps autograd
    assert pre.grad is not None
    W = torch.randn(50, 8, requires_grad=True)
    out = prefix_decode(v.detach(), torch.zeros(3, 4, dtype=torch.long), W, torch.zeros(8), [2, 4])
    out.sum().backward()
    assert W.grad is not None


def test_references_are_what_the_sae_computes():
    """The references are drop-ins for SAE.encode / reconstruct_from_code (the sae.py hooks)."""
    from hsae_runtime import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=12, d_sae=30, k_max=6))
    x = torch.randn(5, 12)
    rows = torch.tensor([1, 6, 3, 2, 5])
    with torch.no_grad():
        pre = sae.pre_activations(x)
        code = sae.encode(x, rows)
        v, i = masked_topk_reference(pre, 6, rows)
        torch.testing.assert_close(v, code.values)
        assert torch.equal(i, code.indices)
        torch.testing.assert_close(
            prefix_decode_reference(v, i, sae.W_dec, sae.b_dec, [4, 1, 6]),
            sae.reconstruct_from_code(code, [4, 1, 6]),
        )


def test_dispatch_keeps_leading_dims():
    """``masked_topk`` takes any ``[..., d_sae]`` (the kernel path only 2-D inputs)."""
    pre = torch.randn(2, 3, 50, device=DEVICE)
    got_v, got_i = masked_topk(pre, 4)
    ref_v, ref_i = masked_topk_reference(pre, 4)
    assert got_v.shape == (2, 3, 4)
    torch.testing.assert_close(got_v, ref_v)
    torch.testing.assert_close(got_i, ref_i)
