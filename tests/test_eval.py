"""Evaluation: an identity SAE is perfect, metrics have the documented shape, the CLI writes
JSON and a plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import InputError
from hsae_runtime.sae import SAE
from hsae_runtime.training.evaluate import default_budgets, evaluate


def identity_sae(d: int) -> SAE:
    """d_sae = 2d latents [x⁺, x⁻]: at k = d every nonzero part is kept, so x̂ = x exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, k_max=d, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_is_perfect(lm, tiny_text_file):
    sae = identity_sae(lm.d_model)
    res = evaluate(sae, lm, tiny_text_file, hookpoint="model.layers.1", budgets=[1, 64],
                   tokens=200, context=32, lm_batch=4)
    full = res["budgets"]["64"]
    assert full["fvu"] < 1e-10 and abs(full["ce_delta"]) < 1e-5
    assert full["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert res["budgets"]["1"]["fvu"] > 0.5 and res["budgets"]["1"]["l0"] <= 1.0
    assert res["tokens"] >= 200 and res["ce_tokens"] == res["tokens"]


def test_metrics_shape(lm, tiny_sae_path, tiny_text_file):
    sae = SAE.load(tiny_sae_path)
    res = evaluate(sae, lm, tiny_text_file, tokens=150, ce_tokens=50, context=32, lm_batch=4)
    assert list(res["budgets"]) == ["1", "2", "4", "8", "16"]
    assert default_budgets(16) == [1, 2, 4, 8, 16]
    for m in res["budgets"].values():
        assert {"fvu", "mse", "ce_delta", "ce_recovered", "l0", "explained_variance"} <= set(m)
        assert m["fvu"] == pytest.approx(1 - m["explained_variance"])
    assert all(m["l0"] <= int(k) for k, m in res["budgets"].items())
    assert 0.0 <= res["dead_fraction"] <= 1.0
    assert 50 <= res["ce_tokens"] < res["tokens"]
    with pytest.raises(InputError, match="k_max"):
        evaluate(sae, lm, tiny_text_file, budgets=[32], tokens=10, context=32)


def test_cli_eval_json_and_plot(tiny_sae_path, tiny_text_file, tmp_path):
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
    assert res["model"] == str(tiny_sae_path) and set(res["budgets"]) == {"2", "8"}
    assert res["tokens"] >= 60 and "dead_fraction" in res and len(res["compare"]) == 1
    assert png.stat().st_size > 1000
