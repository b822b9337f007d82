"""Evaluation: an identity SAE is perfect (FVU, CE delta and KL all 0), the metrics match direct
computations on captured activations, several SAEs share one pass, the compare tables list
every model and budget, and the CLI writes one JSON (exit code 2 on bad input)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError, InputError
from hsae_runtime.lm import capture, next_token_loss, special_token_mask
from hsae_runtime.sae import SAE, per_token_fvu
from hsae_runtime.training.compare import compare_tables, metric_table, model_table, ratio_table
from hsae_runtime.training.data import iter_contexts, read_documents
from hsae_runtime.training.evaluate import ce_and_kl, default_budgets, evaluate, evaluate_many

HOOK = "model.layers.1"


def identity_sae(d: int) -> SAE:
    """d_sae = 2d latents [x⁺, x⁻]: at k = d every nonzero part is kept, so x̂ = x exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, k_max=d, apply_b_dec_to_input=False,
                        hookpoint=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def contexts(lm, tiny_text_file) -> list[torch.Tensor]:
    """Twelve eval contexts ``[32]`` of the tiny corpus."""
    return list(iter_contexts(read_documents(tiny_text_file), lm.tokenizer, 32))[:12]


def test_identity_sae_is_perfect(lm, tiny_text_file):
    sae = identity_sae(lm.d_model)
    res = evaluate(sae, lm, tiny_text_file, budgets=[1, 64], tokens=200, context=32, lm_batch=4)
    full = res["budgets"]["64"]
    assert full["fvu"] < 1e-10 and full["fvu_token"] < 1e-10 and abs(full["ce_delta"]) < 1e-5
    assert 0.0 <= full["kl"] < 1e-6
    assert full["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    one = res["budgets"]["1"]
    assert one["fvu"] > 0.5 and one["l0"] <= 1.0 and one["kl"] > 1e-4
    assert res["kl_zero_ablation"] > one["kl"] > 0
    assert res["tokens"] >= 200 and res["ce_tokens"] == res["tokens"]


def test_metrics_shape_and_dead_fraction(sae, lm, tiny_text_file):
    res = evaluate(sae, lm, tiny_text_file, tokens=150, ce_tokens=50, context=32, lm_batch=4)
    assert list(res["budgets"]) == ["1", "2", "4", "8", "16"]
    assert default_budgets(16) == [1, 2, 4, 8, 16]
    keys = {"fvu", "fvu_token", "mse", "l0", "dead_fraction", "ce", "ce_delta", "ce_recovered",
            "kl", "explained_variance"}
    for k, m in res["budgets"].items():
        assert set(m) == keys
        assert m["fvu"] == pytest.approx(1 - m["explained_variance"])
        assert m["l0"] <= int(k) and m["kl"] >= 0.0 and 0.0 <= m["dead_fraction"] <= 1.0
    dead = [m["dead_fraction"] for m in res["budgets"].values()]
    assert dead == sorted(dead, reverse=True) and dead[0] > dead[-1]
    assert res["dead_fraction"] == dead[-1]
    assert 50 <= res["ce_tokens"] < res["tokens"]
    with pytest.raises(InputError, match="k_max"):
        evaluate(sae, lm, tiny_text_file, budgets=[32], tokens=10, context=32)


def test_fvu_token_matches_captured_activations(sae, lm, contexts):
    # cache_bytes=0: the second pass captures every batch again
    res = evaluate(sae, lm, contexts, budgets=[2, 16], tokens=10**6, ce_tokens=0, lm_batch=5,
                   cache_bytes=0)
    ids = torch.stack(contexts)
    x = capture(lm, HOOK, ids)[~special_token_mask(lm.tokenizer, ids)].double()  # (N, d)
    mean = x.mean(0)
    with torch.no_grad():
        recon = sae.reconstruct(x.float(), [2, 16]).double()  # (2, N, d)
    assert res["tokens"] == len(x)
    for i, k in enumerate(["2", "16"]):
        want_tok = per_token_fvu(x, recon[i], mean).mean().item()
        want = ((recon[i] - x).pow(2).sum() / (x - mean).pow(2).sum()).item()
        assert res["budgets"][k]["fvu_token"] == pytest.approx(want_tok, rel=1e-5)
        assert res["budgets"][k]["fvu"] == pytest.approx(want, rel=1e-5)


def test_ce_and_kl_match_reference():
    gen = torch.Generator().manual_seed(0)
    logits, clean = torch.randn(2, 3, 7, 50, generator=gen)  # (B, T, vocab) each
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    target = torch.rand(3, 7, generator=gen) > 0.3
    ce, kl = ce_and_kl(logits, ids, target, clean, chunk_elements=100)  # 2 positions a chunk
    assert ce == pytest.approx(next_token_loss(logits, ids, target).sum().item(), rel=1e-5)
    logp, logq = F.log_softmax(logits[:, :-1], -1), F.log_softmax(clean[:, :-1], -1)
    per_pos = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # (B, T-1)
    assert kl == pytest.approx((per_pos * target[:, 1:]).sum().item(), rel=1e-5)
    assert ce_and_kl(clean, ids, target, clean)[1] == pytest.approx(0.0, abs=1e-5)


def test_evaluate_many_shares_tokens(sae, lm, contexts):
    ident = identity_sae(lm.d_model)
    kw = {"tokens": 10**6, "ce_tokens": 60, "lm_batch": 4}
    both = evaluate_many({"htopk": sae, "ident": ident}, lm, contexts, budgets=[4, 32], **kw)
    assert list(both["htopk"]["budgets"]) == ["4"]  # k_max 16: budget 32 is left out
    assert list(both["ident"]["budgets"]) == ["4", "32"]
    for key in ("tokens", "ce_tokens", "ce_clean", "ce_zero_ablation"):
        assert both["htopk"][key] == both["ident"][key]
    alone = evaluate(sae, lm, contexts, budgets=[4], **kw)
    for metric, value in alone["budgets"]["4"].items():
        assert both["htopk"]["budgets"]["4"][metric] == pytest.approx(value, rel=1e-5, abs=1e-9)


def test_evaluate_many_errors(sae, lm, contexts):
    narrow = SAE(SAEConfig(d_in=32, d_sae=64, k_max=8, hookpoint=HOOK))
    with pytest.raises(ConfigError, match="different d_in") as err:
        evaluate_many({"a": sae, "b": narrow}, lm, contexts, tokens=10)
    assert err.value.hint
    with pytest.raises(ConfigError, match="different hookpoints"):
        other = SAE(SAEConfig(d_in=64, d_sae=64, k_max=8, hookpoint="model.layers.2"))
        evaluate_many({"a": sae, "b": other}, lm, contexts, tokens=10)
    with pytest.raises(InputError, match="serves none"):
        small = SAE(SAEConfig(d_in=64, d_sae=64, k_max=4, hookpoint=HOOK))
        evaluate_many({"a": sae, "b": small}, lm, contexts, budgets=[8], tokens=10)


def _result(values: dict[int, float], **extra: float) -> dict:
    return {"budgets": {str(k): {"fvu": v, "ce_delta": v - 0.5, **extra}
                        for k, v in values.items()}}


def test_compare_tables_list_every_model_and_budget():
    results = {"htopk": _result({8: 0.2, 16: 0.1, 64: 0.05}), "topk8": _result({8: 0.4}),
               "topk64": _result({8: 0.0, 64: 0.1})}
    text = compare_tables(results, metrics=["fvu", "ce_delta"])
    for needle in ("| htopk |", "| topk8 |", "| topk64 |", "k=8", "k=16", "k=64",
                   "htopk ÷ topk8", "htopk ÷ topk64", "htopk − topk8"):
        assert needle in text
    table = metric_table(results, "fvu").splitlines()
    assert table[0] == "| fvu | k=8 | k=16 | k=64 |" and table[3] == "| topk8 | 0.4000 | – | – |"
    ratios = ratio_table(results, "fvu", "htopk").splitlines()
    assert ratios[2] == "| htopk ÷ topk8 | 0.500 | – | – |"
    assert ratios[3] == "| htopk ÷ topk64 | – | – | 0.500 |"  # over zero: no ratio
    diffs = ratio_table(results, "ce_delta", "htopk", difference=True).splitlines()
    assert diffs[2] == "| htopk − topk8 | -0.2000 | – | – |"
    assert "ratio" not in compare_tables({"htopk": results["htopk"]}, metrics=["fvu"])
    assert model_table(results["htopk"], ["fvu", "ce_delta"]).splitlines()[2] == \
        "| 8 | 0.2000 | -0.3000 |"


def test_cli_eval_compare_json_table_and_plot(tiny_sae_path, tiny_text_file, tmp_path):
    out, png = tmp_path / "eval.json", tmp_path / "fvu.png"
    proc = subprocess.run(
        [sys.executable, "-m", "hsae_runtime.cli", "eval", str(tiny_sae_path),
         "--data", str(tiny_text_file), "--budgets", "2,8", "--tokens", "60",
         "--context", "32", "--json", str(out), "--plot", str(png),
         "--compare", str(tiny_sae_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["reference"] == "tiny" and list(res["models"]) == ["tiny", "tiny-2"]
    main = res["models"]["tiny"]
    assert main["path"] == str(tiny_sae_path) and set(main["budgets"]) == {"2", "8"}
    assert main["tokens"] >= 60 and "dead_fraction" in main and "kl" in main["budgets"]["8"]
    assert main["budgets"] == res["models"]["tiny-2"]["budgets"]
    assert "tiny ÷ tiny-2" in proc.stdout and "| k=2 | k=8 |" in proc.stdout
    assert png.stat().st_size > 1000


def test_cli_eval_missing_compare_file_exits_2(tiny_sae_path, tiny_text_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hsae_runtime.cli", "eval", str(tiny_sae_path),
         "--data", str(tiny_text_file), "--json", str(tmp_path / "e.json"),
         "--compare", str(tmp_path / "absent.safetensors"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "absent.safetensors" in proc.stderr
    assert not (tmp_path / "e.json").exists()


def _cli_eval(args, out, timeout=120):
    return subprocess.run([sys.executable, "-m", "hsae_runtime.cli", "eval", *args,
                           "--json", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_eval_refine_readout_is_recorded_and_lowers_the_error(tiny_sae_path, tiny_text_file,
                                                                 tmp_path):
    common = [str(tiny_sae_path), "--data", str(tiny_text_file), "--budgets", "4,16",
              "--tokens", "60", "--context", "32", "--ce-tokens", "0"]
    runs = {}
    for readout in ("encoder", "refine"):
        proc = _cli_eval([*common, "--readout", readout], tmp_path / f"{readout}.json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[readout] = json.loads((tmp_path / f"{readout}.json").read_text())
        assert runs[readout]["readout"] == readout
    for k in ("4", "16"):
        enc = runs["encoder"]["models"]["tiny"]["budgets"][k]["fvu"]
        ref = runs["refine"]["models"]["tiny"]["budgets"][k]["fvu"]
        assert ref < enc, (k, ref, enc)
    bad = _cli_eval([*common, "--readout", "lstsq"], tmp_path / "bad.json")
    assert bad.returncode == 2 and "readout" in bad.stderr and "refine" in bad.stderr
