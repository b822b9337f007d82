"""hsae_runtime.lm on the tiny random Gemma-2: hooks, early stop, splice, special tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from hsae_runtime.errors import HookpointError, InputError, ModelFileError
from hsae_runtime.hookpoints import valid_hookpoints
from hsae_runtime.lm import (
    Hookpoint,
    capture,
    hook,
    load_lm,
    next_token_loss,
    resolve_hookpoint,
    special_token_mask,
    splice,
)


@pytest.fixture(scope="module")
def batch(lm):
    enc = lm.tokenizer(["the quick brown fox jumps", "sparse codes"], padding=True,
                       return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _hidden(lm, ids, mask):
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def test_load_lm_shape(lm):
    assert lm.n_layers == 3 and lm.d_model == 64
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_equals_hidden_states(lm, batch, layer):
    ids, mask = batch
    ref = _hidden(lm, ids, mask)
    for name in (f"model.layers.{layer}", f"blocks.{layer}.hook_resid_post"):
        got = capture(lm, name, ids, mask)
        torch.testing.assert_close(got, ref[layer + 1], rtol=0, atol=0)
    pre = capture(lm, f"blocks.{layer}.hook_resid_pre", ids, mask)
    torch.testing.assert_close(pre, ref[layer], rtol=0, atol=0)


def test_capture_stops_after_hooked_layer(lm, batch):
    ids, mask = batch
    before = dict(lm.model.model.layers[1]._forward_hooks)
    calls: list[str] = []
    late = lm.model.model.layers[2].register_forward_hook(lambda *a: calls.append("layer2"))
    head = lm.model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try:
        capture(lm, "model.layers.1", ids, mask)
        assert calls == []
        lm.model(input_ids=ids, attention_mask=mask)
        assert calls == ["layer2", "head"]
    finally:
        late.remove()
        head.remove()
    # no hooks of ours left behind (transformers keeps its own output-capturing hooks)
    assert dict(lm.model.model.layers[1]._forward_hooks) == before


def test_hook_removed_after_error(lm, batch):
    ids, _ = batch
    hp = resolve_hookpoint(lm.model, "model.layers.0")
    before = dict(lm.model.model.layers[0]._forward_hooks)

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hook(lm.model, hp, boom):
        lm.model(input_ids=ids)
    assert dict(lm.model.model.layers[0]._forward_hooks) == before


def test_splice_identity_and_zero(lm, batch):
    ids, mask = batch
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask).logits
    same = splice(lm, "model.layers.1", ids, mask, replace=lambda x: x.clone())
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    zero = splice(lm, "model.layers.1", ids, mask, replace=torch.zeros_like)
    assert not torch.allclose(zero, clean)
    keep_bos = splice(lm, "model.layers.1", ids, mask, replace=torch.zeros_like,
                      positions=torch.zeros_like(ids, dtype=torch.bool))
    torch.testing.assert_close(keep_bos, clean, rtol=0, atol=0)


def test_hooks_are_per_thread(lm, batch):
    """A hook registered in one thread does not touch another thread's forward."""
    ids, mask = batch
    hp = resolve_hookpoint(lm.model, "model.layers.1")
    clean = splice(lm, hp, ids, mask)
    seen: list[torch.Tensor] = []
    entered, release = threading.Event(), threading.Event()

    def hold():
        with hook(lm.model, hp, torch.zeros_like):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(10)
    try:
        seen.append(splice(lm, hp, ids, mask))
    finally:
        release.set()
        t.join()
    torch.testing.assert_close(seen[0], clean, rtol=0, atol=0)


def test_unknown_hookpoint_lists_valid(lm):
    with pytest.raises(HookpointError, match="model.layers.0 .. model.layers.2"):
        resolve_hookpoint(lm.model, "model.layers.banana")
    with pytest.raises(HookpointError, match="3 blocks"):
        resolve_hookpoint(lm.model, "blocks.7.hook_resid_post")
    assert "blocks.2.hook_resid_pre" in valid_hookpoints(lm.model)
    sub = resolve_hookpoint(lm.model, "model.layers.1.mlp")
    assert sub == Hookpoint("model.layers.1.mlp", 1, "model.layers.1.mlp", "output")


def test_special_token_mask(lm, batch):
    ids, mask = batch
    special = special_token_mask(lm.tokenizer, ids)
    assert special[:, 0].all()  # BOS
    assert (special[1] == (mask[1] == 0) | (torch.arange(ids.shape[1]) == 0)).all()


def test_next_token_loss_masks():
    logits = torch.zeros(1, 3, 5)
    ids = torch.tensor([[0, 1, 2]])
    loss = next_token_loss(logits, ids, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(loss, torch.tensor([[0.0, torch.log(torch.tensor(5.0))]]))


def test_bad_inputs(lm, tmp_path):
    with pytest.raises(InputError):
        capture(lm, "model.layers.0", torch.zeros(3, dtype=torch.long))
    with pytest.raises(ModelFileError, match="not found: .*missing.gguf"):
        load_lm(str(tmp_path / "missing.gguf"))
    not_model = tmp_path / "weights.bin"
    not_model.write_bytes(b"x")
    with pytest.raises(ModelFileError):
        load_lm(str(not_model))


# ---------------------------------------------------------------------------- portable LM names
def test_portable_gemma_name_resolves_on_any_machine(monkeypatch, tmp_path):
    from hsae_runtime import gguf

    here = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    monkeypatch.setattr(gguf, "gemma3_270m_path", lambda cache_dir=None: here)
    assert gguf.resolve_lm_source(gguf.GEMMA3_270M) == str(here)
    # an old model file naming the assembled GGUF under another machine's home folder
    assert gguf.resolve_lm_source("/home/someone/.cache/x/gemma-3-270m-q4_k_m.gguf") == str(here)
    assert gguf.portable_lm_name(str(here)) == gguf.GEMMA3_270M
    assert gguf.resolve_lm_source("google/gemma-2-2b") == "google/gemma-2-2b"


def test_model_file_serves_after_its_lm_moved(tiny_lm_dir, tmp_path):
    import shutil

    from hsae_runtime.config import SAEConfig
    from hsae_runtime.errors import ModelFileError
    from hsae_runtime.sae import SAE
    from hsae_runtime.serving.server import ServerOptions, load_and_start

    old = tmp_path / "machine_a" / "lm"
    shutil.copytree(tiny_lm_dir, old)
    sae = SAE(SAEConfig(d_in=64, d_sae=128, k_max=8, model_name=str(old),
                        hookpoint="model.layers.1"))
    model = tmp_path / "sae.safetensors"
    sae.save(model)
    new = tmp_path / "machine_b" / "lm"
    new.parent.mkdir()
    old.rename(new)  # the file now lives on a machine where that path does not exist
    moved = tmp_path / "elsewhere" / "sae.safetensors"
    moved.parent.mkdir()
    model.rename(moved)
    with pytest.raises(ModelFileError, match="not found") as err:
        load_and_start(moved, device="cpu", options=ServerOptions(port=0))
    assert "--lm" in (err.value.hint or "")
    running = load_and_start(moved, lm_name=str(new), device="cpu",
                             options=ServerOptions(port=0))
    try:
        assert running.servicer.lm is not None
    finally:
        running.stop(grace=1)
    shutil.rmtree(new)
