"""Generation with the SAE in the loop and steering, on the tiny Gemma-2 and the tiny SAE.

Oracles: the plain LM run over the whole sequence at every step (no KV cache, no hook) and
:func:`hsae_runtime.lm.splice` with the activation the decoder rows predict.
"""

from __future__ import annotations

import math

import pytest
import torch

from hsae_runtime.errors import InputError
from hsae_runtime.generation import GenerationBatch, GenerationRequest, generate
from hsae_runtime.lm import capture, special_token_mask, splice
from hsae_runtime.sae import SparseCode
from hsae_runtime.steering import (
    Intervention,
    SteerSpec,
    parse_intervention,
    steer_activations,
)
from tests.conftest import TINY_HOOKPOINT

PROMPTS = ["The quick brown fox", "Sparse autoencoders decompose activations into"]


def ids_of(lm, text: str) -> list[int]:
    return lm.tokenizer(text)["input_ids"]


def plain_greedy(lm, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """The clean LM, greedy, re-running the whole sequence each step (no cache, no hook)."""
    seq = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            seq.append(token)
            if token in eos:
                break
    return out


def run(lm, sae, requests: list[GenerationRequest]) -> list[list]:
    per_request: list[list] = [[] for _ in requests]
    for steps in generate(lm, sae, TINY_HOOKPOINT, requests):
        for step in steps:
            per_request[step.request].append(step)
    return per_request


def firing_latent(lm, sae, prompt: list[int], k: int) -> tuple[int, float]:
    """The top latent of the prompt's last token at budget k, and its value."""
    x = capture(lm, TINY_HOOKPOINT, torch.tensor([prompt]))[0, -1]  # (d_in,)
    code = sae.encode(x[None], k)
    return int(code.indices[0, 0]), float(code.values[0, 0])


def test_no_intervention_with_error_term_is_the_plain_lm(lm, sae):
    from hsae_runtime.generation import eos_ids

    prompts = [ids_of(lm, p) for p in PROMPTS]  # different lengths: left padding in the batch
    requests = [GenerationRequest(p, SteerSpec(4), max_new_tokens=8) for p in prompts]
    got = run(lm, sae, requests)
    for prompt, steps in zip(prompts, got, strict=True):
        assert [s.token_id for s in steps] == plain_greedy(lm, prompt, 8, eos_ids(lm))
    assert got[0][-1].finish_reason in ("length", "eos")


def test_without_error_term_the_reconstruction_changes_the_output(lm, sae):
    prompt = ids_of(lm, PROMPTS[1])
    clean = run(lm, sae, [GenerationRequest(prompt, SteerSpec(2), max_new_tokens=1)])[0][0]
    recon = run(lm, sae, [GenerationRequest(prompt, SteerSpec(2, (), False), max_new_tokens=1)])
    assert not math.isclose(clean.logprob, recon[0][0].logprob, rel_tol=1e-4) or (
        clean.top != recon[0][0].top
    )


def test_ablation_changes_activation_by_the_decoder_row_and_the_logits_follow(lm, sae):
    k = 4
    prompt = ids_of(lm, PROMPTS[0])
    ids = torch.tensor([prompt])
    latent, _ = firing_latent(lm, sae, prompt, k)
    x = capture(lm, TINY_HOOKPOINT, ids)[0]  # (T, d_in)
    code = sae.encode(x, k)
    value_at = (code.values * (code.indices == latent)).sum(-1)  # (T,) 0 where it is not used
    assert float(value_at[-1]) > 0
    # The spliced activation: exactly x minus value * decoder row, token by token.
    row_of = torch.zeros(x.shape[0], dtype=torch.long)
    spec = SteerSpec(k, (Intervention(latent, "ablate"),))
    steered = steer_activations(sae, x, [spec], row_of)
    expected = x - value_at[:, None] * sae.W_dec[latent]
    torch.testing.assert_close(steered.activations, expected, atol=1e-5, rtol=1e-5)
    # One step's logits against a direct splice of that activation (special tokens clean).
    special = special_token_mask(lm.tokenizer, ids)[0]
    direct = torch.where(special[:, None], x, expected)
    logits = splice(lm, TINY_HOOKPOINT, ids, replace=lambda _: direct[None])[0, -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    req = GenerationRequest(prompt, spec, max_new_tokens=1, top_logprobs=5)
    step = run(lm, sae, [req])[0][0]
    assert step.token_id == int(logp.argmax())
    for token, lp in step.top:
        assert lp == pytest.approx(float(logp[token]), abs=1e-4)


def test_clamp_and_scale_reach_the_spliced_activation(lm, sae):
    k = 4
    prompt = ids_of(lm, PROMPTS[1])
    x = capture(lm, TINY_HOOKPOINT, torch.tensor([prompt]))[0]  # (T, d_in)
    code = sae.encode(x, k)
    row_of = torch.zeros(x.shape[0], dtype=torch.long)
    in_code = int(code.indices[-1, 0])
    outside = next(i for i in range(sae.config.d_sae) if not bool((code.indices == i).any()))
    spec = SteerSpec(k, (Intervention(outside, "set", 40.0), Intervention(in_code, "scale", 3.0)))
    steered = steer_activations(sae, x, [spec], row_of)
    scaled_by = (code.values * (code.indices == in_code)).sum(-1)  # (T,)
    expected = x + 40.0 * sae.W_dec[outside] + 2.0 * scaled_by[:, None] * sae.W_dec[in_code]
    torch.testing.assert_close(steered.activations, expected, atol=1e-4, rtol=1e-5)
    # Without the error term: the decoded steered code itself.
    bare = steer_activations(sae, x, [spec._replace(keep_error=False)], row_of)
    torch.testing.assert_close(bare.activations, sae.decode(bare.code), atol=1e-5, rtol=1e-5)
    # In generation the step's code carries the clamp.
    req = GenerationRequest(prompt, spec, max_new_tokens=2, return_code=True)
    steps = run(lm, sae, [req])[0]
    for step in steps:
        assert step.code is not None
        assert float(step.code.values[step.code.indices == outside].sum()) == pytest.approx(40.0)


def test_condition_latent_gates_the_intervention(lm, sae):
    k = 4
    x = capture(lm, TINY_HOOKPOINT, torch.tensor([ids_of(lm, PROMPTS[1])]))[0]
    code = sae.encode(x, k)
    cond = int(code.indices[-1, 0])
    fires = (code.indices == cond).any(-1)  # (T,)
    assert bool(fires.any()) and not bool(fires.all())
    target = next(i for i in range(sae.config.d_sae) if not bool((code.indices == i).any()))
    spec = SteerSpec(k, (Intervention(target, "set", 10.0, condition=cond),))
    out = steer_activations(sae, x, [spec], torch.zeros(x.shape[0], dtype=torch.long))
    delta = out.activations - x
    expected = fires.float()[:, None] * 10.0 * sae.W_dec[target]
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-5)


def test_compare_unsteered_reports_the_plain_alternatives(lm, sae):
    prompt = ids_of(lm, PROMPTS[0])
    latent, _ = firing_latent(lm, sae, prompt, 4)
    spec = SteerSpec(4, (Intervention(latent, "set", 50.0),))
    req = GenerationRequest(prompt, spec, max_new_tokens=3, compare_unsteered=True)
    steered = run(lm, sae, [req])[0]
    # The unsteered twin sees the same (steered) tokens without the intervention.
    tokens = [s.token_id for s in steered]
    for i, step in enumerate(steered):
        ids = torch.tensor([prompt + tokens[:i]])
        x = capture(lm, TINY_HOOKPOINT, ids)[0]
        plain = steer_activations(sae, x, [SteerSpec(4)], torch.zeros(len(x), dtype=torch.long))
        special = special_token_mask(lm.tokenizer, ids)[0][:, None]
        act = torch.where(special, x, plain.activations)
        logp = torch.log_softmax(
            splice(lm, TINY_HOOKPOINT, ids, replace=lambda _: act[None])[0, -1], -1
        )
        assert step.unsteered_logprob == pytest.approx(float(logp[step.token_id]), abs=1e-4)
        assert [t for t, _ in step.top_unsteered] == logp.topk(5).indices.tolist()


def test_seeded_sampling_repeats_and_top_p_keeps_the_likely(lm, sae):
    prompt = ids_of(lm, PROMPTS[0])
    req = GenerationRequest(prompt, SteerSpec(4), max_new_tokens=6, temperature=1.0, seed=7)
    first = [s.token_id for s in run(lm, sae, [req])[0]]
    again = [s.token_id for s in run(lm, sae, [req])[0]]
    assert first == again
    narrow = GenerationRequest(
        prompt, SteerSpec(4), max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3
    )
    greedy = GenerationRequest(prompt, SteerSpec(4), max_new_tokens=6)
    assert [s.token_id for s in run(lm, sae, [narrow])[0]] == [
        s.token_id for s in run(lm, sae, [greedy])[0]
    ]


def test_stop_string_and_cancel_free_the_rows(lm, sae):
    prompts = [ids_of(lm, p) for p in PROMPTS]
    full = run(lm, sae, [GenerationRequest(prompts[0], SteerSpec(4), max_new_tokens=6)])[0]
    stop = lm.tokenizer.decode([full[2].token_id])
    stopped = run(
        lm, sae, [GenerationRequest(prompts[0], SteerSpec(4), max_new_tokens=6, stop=[stop])]
    )[0]
    assert len(stopped) <= 3 and stopped[-1].finish_reason == "stop"
    reqs = [GenerationRequest(p, SteerSpec(4), max_new_tokens=5) for p in prompts]
    alone = run(lm, sae, [reqs[1]])[0]
    batch = GenerationBatch(lm, sae, TINY_HOOKPOINT, reqs)
    first = batch.step()
    assert len(first) == 2 and batch._cache.mask is not None and batch._cache.mask.shape[0] == 2
    batch.cancel(0)
    rest = [first[1]]
    while not batch.done:
        steps = batch.step()
        assert all(s.request == 1 for s in steps)
        assert batch._cache.mask is None or batch._cache.mask.shape[0] <= 1
        rest += steps
    assert [s.token_id for s in rest] == [s.token_id for s in alone]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (SteerSpec(4, (Intervention(256, "set", 1.0),)), "not a latent id"),
        (SteerSpec(4, (Intervention(-1, "ablate"),)), "not a latent id"),
        (SteerSpec(4, (Intervention(3, "set", float("nan")),)), "not finite"),
        (SteerSpec(4, (Intervention(3, "scale", float("inf")),)), "not finite"),
        (SteerSpec(4, (Intervention(3, "set", 1.0, condition=999),)), "condition latent"),
        (SteerSpec(4, (Intervention(3, "set", 1.0), Intervention(3, "ablate"))), "already"),
        (SteerSpec(17), "k_max=16"),
        (SteerSpec(0), "out of range"),
    ],
)
def test_bad_interventions_raise_input_error_with_hint(lm, sae, spec, match):
    req = GenerationRequest(ids_of(lm, PROMPTS[0]), spec)
    with pytest.raises(InputError, match=match) as info:
        GenerationBatch(lm, sae, TINY_HOOKPOINT, [req])
    assert info.value.hint


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"prompt_ids": []}, "empty"),
        ({"prompt_ids": [10**6]}, "out of range"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_logprobs": 99}, "top_logprobs"),
    ],
)
def test_bad_generation_arguments_raise(lm, sae, changes, match):
    base = {"prompt_ids": ids_of(lm, PROMPTS[0]), "steer": SteerSpec(4)}
    with pytest.raises(InputError, match=match):
        GenerationBatch(lm, sae, TINY_HOOKPOINT, [GenerationRequest(**{**base, **changes})])


def test_parse_intervention_cli_forms():
    assert parse_intervention("1883=40", "set") == Intervention(1883, "set", 40.0)
    assert parse_intervention("12", "ablate") == Intervention(12, "ablate", 0.0)
    with pytest.raises(InputError, match="needs a value"):
        parse_intervention("12", "set")
    with pytest.raises(InputError, match="cannot read"):
        parse_intervention("x=1", "scale")


def test_sparse_code_of_step_has_no_empty_entries(lm, sae):
    req = GenerationRequest(
        ids_of(lm, PROMPTS[0]), SteerSpec(3), max_new_tokens=1, return_code=True
    )
    step = run(lm, sae, [req])[0][0]
    assert isinstance(step.code, SparseCode)
    assert step.code.indices.numel() == 3 and bool((step.code.indices >= 0).all())
