"""First-letter absorption: the per-word rules on hand-made cases, the logistic solver's
optimality, and the whole measure on the tiny LM."""

from __future__ import annotations

import math

import pytest
import torch

from hsae_runtime.features.absorption import (
    AbsorptionConfig,
    absorption_at_budget,
    absorption_scores,
    alpha_tokens,
    fit_balanced_logistic,
    ground_truth_probe,
    prepare_words,
    probe_f1,
)


def test_absorption_rules_on_hand_made_words():
    cos = torch.tensor([1.0, 0.5, 0.05, 0.0])
    acts = torch.tensor([[2.0, 0, 0, 0],   # main latent carries it all: no absorption
                         [0.0, 3, 0, 0],   # main silent, latent 1 carries 75 %: full absorption
                         [1.0, 2, 0, 0],   # absorber carries only a third: below 40 %
                         [1.0, 4, 0, 0],   # partial: 2 of the missing 2, main has 1 -> 2/3
                         [0.0, 0, 10, 0]])  # only a low-cosine latent fires
    resid = torch.tensor([2.0, 2.0, 3.0, 3.0, 1.0])
    frac, full = absorption_scores(acts, resid, cos, [0], AbsorptionConfig())
    assert frac.tolist() == pytest.approx([0.0, 1.0, 0.0, 2 / 3, 0.0])
    assert full.tolist() == [False, True, False, False, True]


def test_balanced_logistic_reaches_the_optimum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 200, 3, generator=gen)
    y = (x[..., 0] + 0.5 * torch.randn(2, 200, generator=gen)) > 0.8  # unbalanced classes
    w, b = fit_balanced_logistic(x, y)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xd, yd = x.double(), y.double()
    pos = yd.sum(1, keepdim=True)
    sw = torch.where(yd > 0, 200 / (2 * pos), 200 / (2 * (200 - pos)))
    z = torch.einsum("pnk,pk->pn", xd, wr) + br[:, None]
    loss = (sw * torch.nn.functional.softplus(-(2 * yd - 1) * z)).sum() + 0.5 * (wr * wr).sum()
    loss.backward()
    assert wr.grad is not None and br.grad is not None
    assert wr.grad.abs().max() < 1e-4 and br.grad.abs().max() < 1e-4
    assert (w[:, 0] > 0).all()


def test_absorption_on_the_tiny_lm(lm, sae):
    words = alpha_tokens(lm.tokenizer)
    assert words and all(w.strip().isalpha() for w in words)
    cfg = AbsorptionConfig(probe_epochs=5, max_k_value=3, lm_batch=32)
    train, test = prepare_words(lm, sae.config.hookpoint, cfg, progress=False)
    assert len(train.words) > len(test.words) > 5
    assert train.x.shape == (len(train.words), 64)
    probe = ground_truth_probe(train, cfg)
    f1 = probe_f1(test, probe)
    assert len(f1) == 26 and all(0 <= v <= 1 for v in f1)
    result = absorption_at_budget(sae, 4, train, test, probe, f1,
                                  AbsorptionConfig(probe_epochs=5, max_k_value=3,
                                                   min_probe_f1=0.0))
    assert result["budget"] == 4 and result["letters"] >= 1
    for key in ("mean_absorption_fraction", "mean_full_absorption_rate"):
        assert 0.0 <= result[key] <= 1.0 and not math.isnan(result[key])
    for letter in result["per_letter"]:
        assert 0 <= letter["num_split_features"] <= 3
