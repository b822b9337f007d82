"""The trainer on the tiny random Gemma-2: data, loss goes down, exact resume, cache, bad inputs."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError, DataError, HookpointError
from hsae_runtime.sae import SAE
from hsae_runtime.training.checkpoint import TrainState
from hsae_runtime.training.data import iter_contexts, read_documents, split_documents
from hsae_runtime.training.optim import (
    AuxK,
    geometric_median,
    lr_at,
    project_decoder_grad,
    renorm_decoder,
)
from hsae_runtime.training.trainer import TrainConfig, finalize, train


def _cfg(tiny_lm_dir, tiny_text_file, tmp_path, **over) -> TrainConfig:
    base = dict(
        lm=str(tiny_lm_dir), hookpoint="model.layers.1", data=str(tiny_text_file),
        d_sae=128, k_max=8, tokens=3000, batch_tokens=128, lr=3e-3, context=32,
        block_contexts=8, lm_batch=8, out=str(tmp_path / "sae.safetensors"), device="cpu",
        progress=False, dead_tokens=1000,
    )
    base.update(over)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- data
def test_read_documents_txt_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n\n\nthree\n")
    assert list(read_documents(txt)) == ["one\ntwo", "three"]
    assert list(read_documents(txt, txt_split="line")) == ["one", "two", "three"]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "hello"}\n\n{"text": "world", "id": 2}\n')
    assert list(read_documents(jl)) == ["hello", "world"]
    jl.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="'text' field"):
        list(read_documents(jl))
    with pytest.raises(DataError, match="not found"):
        list(read_documents(tmp_path / "missing.txt"))


def test_hf_source_fails_cleanly_offline():
    # no `datasets` package, or no network: either way a DataError with a hint, not a traceback
    with pytest.raises(DataError, match="hint"):
        list(read_documents("hf:no-such-user/no-such-dataset"))


def test_contexts_start_with_bos(tiny_lm_dir, tiny_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ctxs = list(iter_contexts(read_documents(tiny_text_file), tok, 16))
    assert len(ctxs) > 10
    assert all(c.shape == (16,) and c[0] == tok.bos_token_id for c in ctxs)
    assert (torch.stack(ctxs)[:, 1:] == tok.eos_token_id).any()  # documents joined with EOS


def test_split_documents_three_disjoint_parts():
    docs = [f"doc {i}" for i in range(20)]
    split = split_documents(docs, val_fraction=0.1, eval_fraction=0.25, seed=1)
    assert (len(split.train), len(split.val), len(split.eval)) == (13, 2, 5)
    parts = [set(split.train), set(split.val), set(split.eval)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sorted(split.train + split.val + split.eval) == sorted(docs)
    # fixed by the seed; another seed gives another split
    assert split == split_documents(docs, val_fraction=0.1, eval_fraction=0.25, seed=1)
    assert split != split_documents(docs, val_fraction=0.1, eval_fraction=0.25, seed=2)


def test_split_documents_refuses_too_few_documents():
    with pytest.raises(DataError, match="too few"):
        split_documents(["a", "b"], val_fraction=0.3, eval_fraction=0.3)


# ---------------------------------------------------------------------------- pieces
def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == 1.0 and lrs[99] == pytest.approx(0.05) and lrs[80] == pytest.approx(1.0)


def test_decoder_constraint_keeps_unit_norm():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k_max=4))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    project_decoder_grad(sae)
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.sub_(0.5 * sae.W_dec.grad)
    renorm_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(16))


def test_geometric_median_resists_outliers():
    x = torch.randn(200, 4) * 0.1 + 1.0
    x[:10] = 1000.0
    assert (geometric_median(x) - 1.0).abs().max() < 0.1


def test_auxk_counts_dead_latents():
    aux = AuxK(6, dead_tokens=100, alpha=1 / 32)
    aux.update(torch.tensor([[0, 1], [1, -1]]), 60)
    assert aux.dead_fraction() == 0.0
    aux.update(torch.tensor([[0, 2]]), 60)
    assert aux.dead_mask().tolist() == [False, False, False, True, True, True]
    sae = SAE(SAEConfig(d_in=8, d_sae=6, k_max=2))
    x = torch.randn(10, 8)
    code = sae.encode(x, 2)
    loss = aux.loss(sae, x, code)
    assert loss is not None and loss.item() > 0
    loss.backward()
    assert sae.W_dec.grad is not None


def test_finalize_folds_scale():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k_max=4))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(50, 8) * 7.0
    scale = 0.3
    cfg = TrainConfig(lm="x", hookpoint="h", data="d", d_sae=32, k_max=4)
    raw = finalize(sae, scale, cfg, TrainState(step=1, tokens=10))
    assert raw.config.normalization_scale == pytest.approx(scale)
    expected = sae.reconstruct(x * scale, [2, 4]) / scale
    torch.testing.assert_close(raw.reconstruct(x, [2, 4]), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw.W_dec.norm(dim=-1), torch.ones(32))


# ---------------------------------------------------------------------------- training
def test_short_run_lowers_loss_and_writes_file(tiny_lm_dir, tiny_text_file, tmp_path):
    cfg = _cfg(tiny_lm_dir, tiny_text_file, tmp_path, tokens=4000)
    result = train(cfg)
    assert result.steps == 31
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first
    sae = SAE.load(cfg.out)
    assert sae.config.normalization_scale is not None and sae.config.hookpoint == "model.layers.1"
    assert sae.config.training["objective"] == "hierarchical"
    assert sae.config.trained_budgets == tuple(range(1, 9))


def test_topk_objective(tiny_lm_dir, tiny_text_file, tmp_path):
    cfg = _cfg(tiny_lm_dir, tiny_text_file, tmp_path, objective="topk", k=4, max_steps=3)
    result = train(cfg)
    assert result.steps == 3
    assert SAE.load(cfg.out).config.trained_budgets == (4,)


def test_resume_is_exact(tiny_lm_dir, tiny_text_file, tmp_path):
    full = train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "a", max_steps=8))
    ckpt = tmp_path / "ckpt"
    first = train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "b", max_steps=5,
                       checkpoint_dir=str(ckpt), checkpoint_every=5))
    assert first.losses == full.losses[:5]
    second = train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "b", max_steps=8,
                        checkpoint_dir=str(ckpt), resume=True))
    assert second.losses == full.losses[5:8]  # bitwise: same data order and optimiser state
    with pytest.raises(ConfigError, match="settings differ"):
        train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "b", lr=1e-3,
                   checkpoint_dir=str(ckpt), resume=True))


def test_activation_cache_reused(tiny_lm_dir, tiny_text_file, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(activation_cache=str(cache), cache_dtype="float32", tokens=4000)
    first = train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "a", **kw))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["blocks"] >= 2 and manifest["tokens"] > 0
    second = train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path / "b", **kw))
    assert second.lm_seconds == 0.0  # the LM never ran
    assert second.losses == first.losses
    # The same file named by a relative path still matches the cache ...
    relative = os.path.relpath(tiny_text_file)
    third = train(_cfg(tiny_lm_dir, relative, tmp_path / "c", **{**kw, "max_steps": 2}))
    assert third.lm_seconds == 0.0
    # ... but an edited file does not reuse stale activations.
    edited = tmp_path / "edited.txt"
    edited.write_text(Path(tiny_text_file).read_text())
    train(_cfg(tiny_lm_dir, edited, tmp_path / "d", **{**kw, "max_steps": 2}))
    edited.write_text(Path(tiny_text_file).read_text() + "\nOne more line of text.\n")
    os.utime(edited, (1e9, 1e9))
    fourth = train(_cfg(tiny_lm_dir, edited, tmp_path / "e", **{**kw, "max_steps": 2}))
    assert fourth.lm_seconds > 0.0  # rebuilt


# ---------------------------------------------------------------------------- errors
def test_bad_inputs(tiny_lm_dir, tiny_text_file, tmp_path):
    with pytest.raises(ConfigError, match="k_max"):
        _cfg(tiny_lm_dir, tiny_text_file, tmp_path, k_max=200)
    with pytest.raises(DataError, match="not found"):
        train(_cfg(tiny_lm_dir, tmp_path / "nope.txt", tmp_path))
    with pytest.raises(HookpointError, match="valid hookpoints"):
        train(_cfg(tiny_lm_dir, tiny_text_file, tmp_path, hookpoint="layers.x"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable text"):
        train(_cfg(tiny_lm_dir, empty, tmp_path))
    with pytest.raises(ConfigError, match="objective"):
        replace(_cfg(tiny_lm_dir, tiny_text_file, tmp_path), objective="dense")


def test_cli_train_errors_are_one_line(tiny_lm_dir, tiny_text_file, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "hsae_runtime.cli", "train", "--lm", str(tiny_lm_dir),
         "--hookpoint", "model.layers.1", "--data", str(tiny_text_file), "--d-sae", "16",
         "--k-max", "32", "--out", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "k_max (32) must be <= d_sae (16)" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- validation
def test_validation_split_is_disjoint_and_cached(tiny_text_file):
    from hsae_runtime.training.validation import split_data

    train_path, val_path = split_data(str(tiny_text_file), 0.2, seed=3)
    assert val_path is not None
    train_docs = set(Path(train_path).read_text().strip().split("\n\n"))
    val_docs = set(Path(val_path).read_text().strip().split("\n\n"))
    every = set(tiny_text_file.read_text().strip().split("\n\n"))
    assert len(val_docs) == 12 and not train_docs & val_docs and train_docs | val_docs == every
    assert split_data(str(tiny_text_file), 0.2, seed=3) == (train_path, val_path)
    assert split_data(str(tiny_text_file), 0.0, seed=3) == (str(tiny_text_file), None)


def test_validator_keeps_best_weights_and_stops(monkeypatch):
    from hsae_runtime.training import validation

    sae = SAE(SAEConfig(d_in=4, d_sae=8, k_max=2))
    scripted = iter([3.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(validation, "objective_loss", lambda *a, **k: next(scripted))
    v = validation.Validator(torch.zeros(3, 4), "hierarchical", 2, [1, 2], every=1, patience=2)
    for step in range(1, 5):
        with torch.no_grad():
            sae.b_dec.fill_(float(step))
        v.check(sae, step, train_loss=1.0)
        assert v.should_stop == (step == 4)
    v.restore_best(sae)
    assert v.best_step == 2 and float(sae.b_dec[0]) == 2.0
    assert [h["val_loss"] for h in v.history] == [3.0, 2.0, 2.5, 2.6]


def test_training_validates_and_writes_best_checkpoint(tiny_lm_dir, tiny_text_file, tmp_path):
    cfg = _cfg(tiny_lm_dir, tiny_text_file, tmp_path, tokens=4000, val_fraction=0.2,
               val_every=5, val_tokens=512)
    result = train(cfg)
    assert [h["step"] for h in result.validation] == [5, 10, 15, 20, 25, 30, 31]
    losses = [h["val_loss"] for h in result.validation]
    assert result.best_step == result.validation[losses.index(min(losses))]["step"]
    meta = SAE.load(cfg.out).config.training
    assert meta["best_step"] == result.best_step and meta["val_fraction"] == 0.2


def test_lr_auto_is_a_width_rule_that_reads_no_data():
    """``--lr auto`` uses no text at all (so it cannot look at eval documents): the anchor
    chosen on validation documents, scaled by 1/sqrt(width)."""
    from hsae_runtime.training.config import AUTO_LR_REFERENCE, auto_lr

    lr_ref, d_ref = AUTO_LR_REFERENCE
    assert auto_lr(d_ref) == pytest.approx(lr_ref)
    assert auto_lr(4 * d_ref) == pytest.approx(lr_ref / 2)
    a = TrainConfig(lm="x", hookpoint="h", data="train.txt", d_sae=8192, k_max=64)
    b = replace(a, data="other.txt", val_data="val.txt")
    assert a.lr == "auto" and a.peak_lr == b.peak_lr == pytest.approx(auto_lr(8192))
    assert TrainConfig(lm="x", hookpoint="h", data="t", d_sae=8192, k_max=64, lr=1e-3).peak_lr \
        == 1e-3
