"""The ``refine`` readout (hsae_runtime.refine): values refitted per token to the SAE's own
prefix objective, the same latents in the same order, nested prefixes, non-negative codes, and
the same readout through ``serve``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError
from hsae_runtime.loss import hierarchical_topk_loss
from hsae_runtime.refine import prefix_masses, refine_values
from hsae_runtime.sae import SAE


def _sae(budgets=None, *, d_in=24, d_sae=96, k_max=8, seed=0) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k_max=k_max, budgets=budgets))
    gen = torch.Generator().manual_seed(seed)
    sae.reset_parameters(generator=gen)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3, generator=gen)
        sae.b_dec.normal_(0.0, 0.1, generator=gen)
    return sae.requires_grad_(False)


def _stacked_lstsq(x, E, b_dec, weights, live):
    """Independent float64 reference: minimise Σ_j w_j ‖x − b − Σ_{i≤j} v_i e_i‖² over the
    ``live`` entries (others 0) by stacking the weighted prefix systems into one lstsq."""
    k = E.shape[0]
    rows, rhs = [], []
    for j in range(k):
        if weights[j] == 0:
            continue
        A = np.zeros((E.shape[1], k))
        A[:, : j + 1] = E[: j + 1].T
        rows.append(np.sqrt(weights[j]) * A)
        rhs.append(np.sqrt(weights[j]) * (x - b_dec))
    A, y = np.vstack(rows)[:, live], np.concatenate(rhs)
    out = np.zeros(k)
    out[live] = np.linalg.lstsq(A, y, rcond=None)[0]
    return out


@pytest.mark.parametrize("budgets", [None, (8,), (2, 5, 8)])
def test_refined_values_are_the_least_squares_optimum_on_their_support(budgets):
    sae = _sae(budgets)
    x = torch.randn(40, 24)
    v, i = sae.encode(x, 8)
    r = refine_values(x, v, i, sae.W_dec, sae.b_dec, sae.config.trained_budgets)
    w = np.zeros(8)
    for b in sae.config.trained_budgets:
        w[b - 1] += 1.0
    checked = 0
    for n in range(len(x)):
        live = r[n].numpy() > 0  # the support the active-set step kept
        ref = _stacked_lstsq(x[n].double().numpy(), sae.W_dec[i[n]].double().numpy(),
                             sae.b_dec.double().numpy(), w, live)
        np.testing.assert_allclose(r[n].numpy(), ref, rtol=2e-3, atol=2e-4)
        checked += int(live.sum())
    assert checked > 0.7 * x.shape[0] * 8  # most entries stay live: the check has teeth


def test_prefix_masses_count_the_prefixes_holding_both_ranks():
    M, N = prefix_masses([2, 4], 4)  # prefixes 2 and 4, weight 1/2 each
    assert N.tolist() == [1.0, 1.0, 0.5, 0.5]
    assert M[0, 3].item() == 0.5 and M[1, 0].item() == 1.0 and M[2, 2].item() == 0.5


def test_refine_lowers_the_models_own_loss_and_keeps_latents_and_order():
    sae = _sae()
    x = torch.randn(256, 24)
    enc = sae.encode(x, 8)
    ref = sae.set_readout("refine").encode(x, 8)
    sae.set_readout("encoder")
    assert torch.equal(ref.indices, enc.indices)
    assert bool((ref.values >= 0).all())
    assert not torch.allclose(ref.values, enc.values)

    def loss(code):
        return float(hierarchical_topk_loss(x, code.values, code.indices, sae.W_dec, sae.b_dec))

    assert loss(ref) < 0.9 * loss(enc)


def test_refined_codes_stay_nested_and_respect_row_budgets():
    sae = _sae().set_readout("refine")
    x = torch.randn(3, 10, 24)
    full = sae.encode(x, 8)
    small = sae.encode(x, 3)
    assert torch.equal(small.values, full.values[..., :3])
    assert torch.equal(small.indices, full.indices[..., :3])
    rows = torch.tensor([1, 8, 4])
    masked = sae.encode(x[:, 0], rows)
    flat = full.values[:, 0]
    for n, k in enumerate(rows.tolist()):
        assert torch.equal(masked.values[n, :k], flat[n, :k])
        assert bool((masked.indices[n, k:] == -1).all()) and bool((masked.values[n, k:] == 0).all())
    # reconstruct() goes through the same readout
    rec = sae.reconstruct(x, [3])
    assert torch.allclose(rec[0], sae.decode(small), atol=1e-5)


def test_a_topk_model_refits_only_up_to_its_trained_budget():
    sae = _sae((3,))
    x = torch.randn(64, 24)
    enc = sae.encode(x, 8)
    ref = sae.set_readout("refine").encode(x, 8)
    assert torch.equal(ref.values[:, 3:], enc.values[:, 3:])
    assert not torch.allclose(ref.values[:, :3], enc.values[:, :3])


def test_latents_the_encoder_left_at_zero_stay_zero():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)  # every pre-activation is negative: ReLU'd to 0
    x = torch.randn(16, 24)
    ref = sae.set_readout("refine").encode(x, 8)
    assert bool((ref.values == 0).all())


def test_a_row_whose_system_overflows_keeps_the_encoder_values():
    sae = _sae()
    x = torch.randn(4, 24)
    v, i = sae.encode(x, 8)
    x[1] = 3e38  # finite, but E (x - b_dec) overflows float32
    ref = refine_values(x, v, i, sae.W_dec, sae.b_dec, sae.config.trained_budgets)
    assert torch.equal(ref[1], v[1]) and bool(torch.isfinite(ref).all())
    assert not torch.allclose(ref[0], v[0])


def test_unknown_readout_is_a_config_error():
    with pytest.raises(ConfigError, match="readout") as err:
        _sae().set_readout("bogus")  # type: ignore[arg-type]
    assert "refine" in (err.value.hint or "")


def test_serve_applies_the_readout_and_says_so(tiny_sae_path, sae):
    from hsae_runtime.client import Client
    from hsae_runtime.serving import server as srv

    running = srv.load_and_start(tiny_sae_path, no_lm=True, readout="refine",
                                 options=srv.ServerOptions(port=0))
    try:
        x = torch.randn(6, 64)
        with Client(running.address) as client:
            assert client.info().backend == "torch+refine"
            res = client.encode(activations=x.numpy(), budgets=[4, 16])
        want = SAE.load(tiny_sae_path).set_readout("refine").encode(x, 16)
        plain = sae.encode(x, 16)
        np.testing.assert_array_equal(res.indices, want.indices.numpy())
        np.testing.assert_allclose(res.values, want.values.numpy(), rtol=1e-4, atol=1e-5)
        assert not np.allclose(res.values, plain.values.numpy(), rtol=1e-3, atol=1e-4)
    finally:
        running.stop(grace=1)


def test_refine_needs_the_torch_backend(tiny_sae_path):
    from hsae_runtime.serving.backend import load_backend

    with pytest.raises(ConfigError, match="torch backend only"):
        load_backend(tiny_sae_path, backend="onnx", readout="refine")
