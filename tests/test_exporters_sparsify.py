"""sparsify folders: transposed encoder, round trips, and refusals of non-TopK coders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.errors import ConfigError, ModelFileError
from hsae_runtime.exporters.sparsify import export_sparsify, import_sparsify


def make_sae(**kw) -> SAE:
    sae = SAE(SAEConfig(d_in=12, d_sae=36, k_max=5, hookpoint="layers.4", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def sparsify_encode(folder: Path, x: torch.Tensor, k: int):
    """sparsify's encoder semantics, written from its docs: top-k of relu(linear(x - b_dec))."""
    t = load_file(folder / "sae.safetensors")
    pre = torch.relu(torch.nn.functional.linear(x - t["b_dec"], t["encoder.weight"],
                                                t["encoder.bias"]))
    return pre.topk(k, sorted=True)


def test_export_layout_and_semantics(tmp_path):
    sae = make_sae()
    export_sparsify(sae, tmp_path / "layers.4")
    cfg = json.loads((tmp_path / "layers.4" / "cfg.json").read_text())
    assert cfg["k"] == 5 and cfg["num_latents"] == 36 and cfg["d_in"] == 12
    assert cfg["activation"] == "topk" and not cfg["transcode"] and not cfg["skip_connection"]
    t = load_file(tmp_path / "layers.4" / "sae.safetensors")
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert t["encoder.weight"].shape == (36, 12)
    assert torch.equal(t["encoder.weight"], sae.W_enc.detach().T)
    x = torch.randn(4, 12)
    ref = sparsify_encode(tmp_path / "layers.4", x, 5)
    code = sae.encode(x, 5)
    torch.testing.assert_close(code.values, ref.values)


def test_round_trip(tmp_path):
    sae = make_sae(budgets=(1, 3, 5))
    export_sparsify(sae, tmp_path / "f")
    back = import_sparsify(tmp_path / "f")
    assert back.config == sae.config
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))


def foreign(tmp_path: Path, skip: bool = False, dtype=torch.bfloat16, **cfg_overrides) -> Path:
    folder = tmp_path / "layers.7.mlp"
    folder.mkdir()
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
           "num_latents": 0, "k": 3, "multi_topk": False, "skip_connection": skip,
           "transcode": False, "d_in": 6}
    cfg.update(cfg_overrides)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"encoder.weight": torch.randn(24, 6), "encoder.bias": torch.randn(24),
               "W_dec": torch.randn(24, 6), "b_dec": torch.randn(6)}
    if skip:
        tensors["W_skip"] = torch.zeros(6, 6)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, folder / "sae.safetensors")
    return folder


def test_import_foreign(tmp_path):
    folder = foreign(tmp_path)
    sae = import_sparsify(folder)
    cfg = sae.config
    assert (cfg.d_in, cfg.d_sae, cfg.k_max) == (6, 24, 3)  # d_sae from expansion_factor
    assert cfg.hookpoint == "layers.7.mlp" and cfg.dtype == "bfloat16"
    assert cfg.apply_b_dec_to_input
    x = torch.randn(5, 6)
    ref = sparsify_encode(folder, x.bfloat16(), 3)
    code = sae.encode(x.bfloat16(), 3)
    torch.testing.assert_close(code.values, ref.values)
    as_f32 = import_sparsify(folder, dtype="float32", hookpoint="h")
    assert as_f32.W_enc.dtype == torch.float32 and as_f32.config.hookpoint == "h"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transcode": True}, "transcode"),
        ({"skip_connection": True}, "skip_connection"),
        ({"embed_skip": True}, "embed_skip"),
        ({"activation": "groupmax"}, "groupmax"),
    ],
)
def test_refusals(tmp_path, kwargs, match):
    with pytest.raises(ModelFileError, match=match):
        import_sparsify(foreign(tmp_path, **kwargs))


def test_refuses_w_skip_tensor(tmp_path):
    folder = foreign(tmp_path, skip=True)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["skip_connection"] = False  # a lying config: the tensor still tells
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="W_skip"):
        import_sparsify(folder)


def test_export_refuses_no_b_dec_input(tmp_path):
    with pytest.raises(ConfigError, match="apply_b_dec_to_input"):
        export_sparsify(make_sae(apply_b_dec_to_input=False), tmp_path / "f")
