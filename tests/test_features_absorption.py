"""First-letter absorption: the per-word rules on hand-made cases, the logistic solver's
optimality against its L-BFGS reference, the sparse multi-probe against the dense one, batched
LM residuals against one prompt at a time, and the whole measure on the tiny LM."""

from __future__ import annotations

import math

import pytest
import torch

from hsae_runtime.features.absorption import (
    AbsorptionConfig,
    absorption_at_budget,
    absorption_scores,
    alpha_tokens,
    build_prompts,
    dense_code,
    encode_words,
    ground_truth_probe,
    prepare_words,
    probe_f1,
    word_residuals,
)
from hsae_runtime.features.probes import (
    fit_balanced_logistic,
    fit_balanced_logistic_reference,
    train_multi_probe,
)
from hsae_runtime.sae import SparseCode


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
    w_ref, b_ref = fit_balanced_logistic_reference(x, y)
    assert torch.allclose(w, w_ref, atol=1e-4) and torch.allclose(b, b_ref, atol=1e-4)


def test_newton_is_at_least_as_good_as_lbfgs_on_separable_problems():
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(3, 60, 4, generator=gen))  # sparse-ish, like latent activations
    y = x[..., 1] > 0.5  # separable: the unpenalised intercept has a flat optimum
    def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        yd = y.double()
        pos = yd.sum(1, keepdim=True)
        sw = torch.where(yd > 0, 60 / (2 * pos), 60 / (2 * (60 - pos)))
        z = torch.einsum("pnk,pk->pn", x.double(), w) + b[:, None]
        return ((sw * torch.nn.functional.softplus(-(2 * yd - 1) * z)).sum(1)
                + 0.5 * (w * w).sum(1))
    newton, lbfgs = objective(*fit_balanced_logistic(x, y)), objective(
        *fit_balanced_logistic_reference(x, y))
    assert (newton <= lbfgs + 1e-6 * lbfgs.abs()).all()


def test_sparse_multi_probe_equals_the_dense_one():
    gen = torch.Generator().manual_seed(0)
    n, d_sae, k = 300, 50, 4
    values = torch.rand(n, k, generator=gen)
    indices = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(n)])
    code = SparseCode(values, indices)
    y = torch.nn.functional.one_hot(indices[:, 0] % 5, 5).float()
    w_sparse, b_sparse = train_multi_probe(code, y, epochs=5, lr=1e-2, weight_decay=1e-6,
                                           batch_size=128, l1=0.01, seed=3, width=d_sae)
    w_dense, b_dense = train_multi_probe(dense_code(code, d_sae), y, epochs=5, lr=1e-2,
                                         weight_decay=1e-6, batch_size=128, l1=0.01, seed=3)
    assert torch.allclose(w_sparse, w_dense, atol=1e-5)
    assert torch.allclose(b_sparse, b_dense, atol=1e-5)


def test_batched_residuals_equal_one_prompt_at_a_time(lm, sae):
    import random

    # words the tiny tokenizer splits vary the prompts' lengths (they are then dropped)
    words = alpha_tokens(lm.tokenizer)[:20] + ["xylophonequartz", "zzyzx", "quokkaflux"]
    cfg = AbsorptionConfig(max_icl_examples=3)
    prompts = build_prompts(words, cfg, random.Random(0))
    lengths = {len(lm.tokenizer(p)["input_ids"]) for p, _ in prompts}
    assert len(lengths) > 1, "the test needs prompts of different lengths (padding)"
    one = word_residuals(lm, sae.config.hookpoint, words, prompts,
                         AbsorptionConfig(max_icl_examples=3, lm_batch=1), progress=False)
    batched = word_residuals(lm, sae.config.hookpoint, words, prompts,
                             AbsorptionConfig(max_icl_examples=3, lm_batch=7), progress=False)
    assert one.words == batched.words and 0 < len(one.words) < len(words)
    assert torch.equal(one.letter, batched.letter)
    torch.testing.assert_close(batched.x, one.x, atol=1e-5, rtol=1e-5)


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
    # the codes at k_max serve every budget through their prefixes
    shared = absorption_at_budget(sae, 4, train, test, probe, f1,
                                  AbsorptionConfig(probe_epochs=5, max_k_value=3,
                                                   min_probe_f1=0.0),
                                  codes=encode_words(sae, train, test, sae.config.k_max))
    assert shared.keys() == result.keys()
    assert [shared[k] for k in ("budget", "letters")] == [result[k] for k in ("budget", "letters")]
    for key in ("mean_absorption_fraction", "mean_full_absorption_rate",
                "mean_num_split_features"):
        assert shared[key] == pytest.approx(result[key])
    assert len(shared["per_letter"]) == len(result["per_letter"])
    for a, b in zip(shared["per_letter"], result["per_letter"]):
        assert a == pytest.approx(b)
