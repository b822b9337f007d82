"""The SAE module: sorted nested codes, per-row budgets, sparse decode, multi-budget reconstruct."""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import SAE, InputError, SAEConfig, SparseCode, fvu, per_token_fvu


@pytest.fixture
def sae() -> SAE:
    torch.manual_seed(0)
    model = SAE(SAEConfig(d_in=24, d_sae=96, k_max=16))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    return model


def test_encode_is_sorted_relu_topk(sae: SAE) -> None:
    x = torch.randn(7, 24)
    code = sae.encode(x, 16)
    assert code.values.shape == code.indices.shape == (7, 16)
    assert code.indices.dtype == torch.int64
    assert (code.values[:, :-1] >= code.values[:, 1:]).all()
    assert (code.values >= 0).all()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.relu(pre.topk(16, dim=-1).values)
    torch.testing.assert_close(code.values, expected)
    torch.testing.assert_close(pre.gather(1, code.indices).relu(), code.values)


def test_apply_b_dec_to_input_false() -> None:
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k_max=4, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec.fill_(3.0)
    x = torch.randn(3, 8)
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x, 4).values, pre.topk(4).values.relu())


@pytest.mark.parametrize("k_small", [1, 3, 8, 15])
def test_codes_are_nested_prefixes(sae: SAE, k_small: int) -> None:
    x = torch.randn(11, 24)
    big, small = sae.encode(x, 16), sae.encode(x, k_small)
    torch.testing.assert_close(big.values[:, :k_small], small.values)
    # indices may differ only where values tie; compare decoded outputs as well
    torch.testing.assert_close(sae.decode(big.prefix(k_small)), sae.decode(small))


def test_leading_dims_are_kept(sae: SAE) -> None:
    x = torch.randn(2, 5, 24)
    code = sae.encode(x, 4)
    assert code.values.shape == (2, 5, 4)
    assert sae.decode(code).shape == (2, 5, 24)
    assert sae.reconstruct(x, [1, 4]).shape == (2, 2, 5, 24)


def test_per_row_budgets_mask_the_tail(sae: SAE) -> None:
    x = torch.randn(5, 24)
    k = torch.tensor([1, 3, 7, 2, 5])
    code = sae.encode(x, k)
    assert code.values.shape == (5, 7)
    full = sae.encode(x, 7)
    for row, kr in enumerate(k.tolist()):
        torch.testing.assert_close(code.values[row, :kr], full.values[row, :kr])
        assert (code.values[row, kr:] == 0).all()
        assert (code.indices[row, kr:] == -1).all()
        expected = sae.decode(sae.encode(x[row : row + 1], kr))
        torch.testing.assert_close(sae.decode(code)[row : row + 1], expected)


def test_sparse_decode_matches_dense(sae: SAE) -> None:
    x = torch.randn(9, 24)
    for k in (1, 5, 16):
        code = sae.encode(x, k)
        torch.testing.assert_close(sae.decode(code), sae.decode_dense(code), rtol=1e-5, atol=1e-5)
    masked = sae.encode(x, torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    torch.testing.assert_close(sae.decode(masked), sae.decode_dense(masked), rtol=1e-5, atol=1e-5)


def test_reconstruct_equals_separate_decodes(sae: SAE) -> None:
    x = torch.randn(6, 24)
    budgets = [16, 1, 4, 4, 9]
    recons = sae.reconstruct(x, budgets)
    assert recons.shape == (5, 6, 24)
    for i, b in enumerate(budgets):
        torch.testing.assert_close(recons[i], sae.decode(sae.encode(x, b)), rtol=1e-5, atol=1e-5)


def test_full_budget_reconstruction_improves_with_k() -> None:
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=16, d_sae=16, k_max=16))
    with torch.no_grad():  # orthonormal dictionary: k = d_in reconstructs exactly
        q, _ = torch.linalg.qr(torch.randn(16, 16))
        sae.W_dec.copy_(q)
        sae.W_enc.copy_(q.T)
    x = torch.randn(32, 16).abs() @ q  # non-negative codes in that basis
    recons = sae.reconstruct(x, [1, 4, 16])
    errs = fvu(x, recons)
    assert errs.shape == (3,)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-8
    assert float(fvu(x, recons[2]).detach()) < 1e-8


def test_per_token_fvu(sae: SAE) -> None:
    x = torch.randn(4, 24)
    assert torch.allclose(per_token_fvu(x, x, sae.b_dec), torch.zeros(4))
    ones = per_token_fvu(x, sae.b_dec.expand_as(x), sae.b_dec)
    assert torch.allclose(ones, torch.ones(4))


@pytest.mark.parametrize("k", [0, -1, 17, 2.5, True])
def test_bad_budget_is_a_clear_error(sae: SAE, k) -> None:
    with pytest.raises(InputError, match="budget"):
        sae.encode(torch.randn(2, 24), k)


def test_bad_inputs_are_clear_errors(sae: SAE) -> None:
    with pytest.raises(ValueError, match="d_in=24"):
        sae.encode(torch.randn(2, 23), 4)
    bad = torch.randn(2, 24)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sae.encode(bad, 4)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sae.encode(bad, 4)
    with pytest.raises(InputError, match="empty"):
        sae.encode(torch.zeros(0, 24), 4)
    with pytest.raises(InputError, match="floating"):
        sae.encode(torch.zeros(2, 24, dtype=torch.int64), 4)
    with pytest.raises(InputError, match="1..k_max"):
        sae.encode(torch.randn(3, 24), torch.tensor([1, 0, 3]))
    with pytest.raises(InputError, match="rows"):
        sae.encode(torch.randn(3, 24), torch.tensor([1, 2]))
    with pytest.raises(InputError, match="budgets must not be empty"):
        sae.reconstruct(torch.randn(3, 24), [])
    with pytest.raises(InputError, match="indices must lie"):
        sae.decode(SparseCode(torch.ones(1, 2), torch.tensor([[0, 96]])))
    with pytest.raises(InputError, match="same shape"):
        sae.decode(SparseCode(torch.ones(1, 2), torch.tensor([[0, 1, 2]])))
    with pytest.raises(InputError, match="prefix budget"):
        SparseCode(torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long)).prefix(3)


def test_encode_decode_gradients_flow(sae: SAE) -> None:
    x = torch.randn(4, 24)
    code = sae.encode(x, 8)
    sae.decode(code).pow(2).sum().backward()
    for p in sae.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
