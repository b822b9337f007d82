"""The lean training encoder: same code as ``SAE.encode`` and the same gradients as autograd
through the dense path, for every input that needs one (numba kernel and torch fallback)."""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import SAE, InputError, SAEConfig, sparse_encoder
from hsae_runtime.kernels import encoder_cpu


@pytest.fixture(params=["kernel", "torch"])
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "kernel" and not encoder_cpu.available():
        pytest.skip("needs numba")
    if request.param == "torch":
        monkeypatch.setattr(encoder_cpu, "supports", lambda x: False)
    return request.param


def make_sae(d_in: int, d_sae: int, k_max: int, *, apply_b_dec: bool = True, double=True):
    """A random SAE; float64 (cast after construction: configs store float32) unless told."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k_max=k_max, apply_b_dec_to_input=apply_b_dec))
    if double:
        sae = sae.double()
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(0, 0.5)  # some pre-activations negative: exercises the ReLU mask
        sae.b_dec.normal_(0, 0.5)
    return sae


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize(("n", "d_in", "d_sae", "k"), [(9, 13, 70, 5), (4, 67, 200, 11)])
def test_grads_match_dense_autograd(backend, apply_b_dec, x_grad, n, d_in, d_sae, k) -> None:
    sae = make_sae(d_in, d_sae, 16, apply_b_dec=apply_b_dec)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=x_grad)
    lean = sae.encode_for_training(x, k)
    dense = sae.encode(x, k)
    assert torch.equal(lean.indices, dense.indices)
    torch.testing.assert_close(lean.values, dense.values)
    weight = torch.randn_like(dense.values)
    inputs = [sae.W_enc, sae.b_enc, sae.b_dec] + ([x] if x_grad else [])
    got = torch.autograd.grad((lean.values * weight).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((dense.values * weight).sum(), inputs, allow_unused=True)
    for g, w, name in zip(got, want, ["W_enc", "b_enc", "b_dec", "x"]):
        if w is None:  # b_dec does not reach the code without apply_b_dec_to_input
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_gradcheck_float64(backend) -> None:
    sae = make_sae(6, 20, 4)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, W_enc, b_enc, b_dec):
        values, _ = sparse_encoder.encode_for_training(x, W_enc, b_enc, b_dec, 3)
        return values

    # the top-k selection is piecewise constant; small eps keeps the selection fixed
    assert torch.autograd.gradcheck(fn, (x, sae.W_enc, sae.b_enc, sae.b_dec), eps=1e-7)


def test_float32_step_with_fused_adam(backend) -> None:
    sae = make_sae(24, 96, 8, double=False)
    x = torch.randn(32, 24)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    code = sae.encode_for_training(x, 8)
    loss = (sae.decode(code) - x).pow(2).mean()
    loss.backward()
    want = torch.autograd.grad((sae.decode(sae.encode(x, 8)) - x).pow(2).mean(), sae.W_enc)[0]
    torch.testing.assert_close(sae.W_enc.grad, want)
    assert sae.W_enc.grad is not None and sae.W_enc.grad.is_contiguous()
    before = sae.W_enc.detach().clone()
    opt.step()
    assert not torch.equal(before, sae.W_enc)


def test_leading_dims_and_errors() -> None:
    sae = make_sae(8, 30, 4)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    code = sae.encode_for_training(x, 4)
    assert code.values.shape == code.indices.shape == (2, 3, 4)
    with pytest.raises(InputError, match="k_max"):
        sae.encode_for_training(x, 5)
    with pytest.raises(InputError, match="d_in"):
        sae.encode_for_training(torch.randn(3, 7, dtype=torch.float64), 2)


def test_grad_w_enc_kernel_direct() -> None:
    if not encoder_cpu.available():
        pytest.skip("needs numba")
    xc = torch.randn(10, 70)
    indices = torch.randint(0, 150, (10, 6))  # repeats across tokens; d_sae not a tile multiple
    indices[3, 4:] = -1
    dpre = torch.randn(10, 6)
    got = encoder_cpu.grad_w_enc(xc, indices, dpre, 150)
    keep = indices >= 0
    want = torch.zeros(150, 70)
    want.index_add_(0, indices[keep], dpre[keep][:, None] * xc[keep.nonzero()[:, 0]])
    torch.testing.assert_close(got, want.t())
