"""The single-file model format: round trip, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hsae_runtime import SAE, ModelFileError, SAEConfig
from hsae_runtime.format import FORMAT_NAME, read_config


def _sae(**kw) -> SAE:
    cfg = SAEConfig(d_in=12, d_sae=40, k_max=6, budgets=(2, 4, 6), model_name="tiny",
                    hookpoint="model.layers.1", normalization_scale=2.5,
                    training={"objective": "hierarchical", "tokens": 123}, **kw)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip(tmp_path: Path, dtype: str) -> None:
    sae = _sae(dtype=dtype)
    path = tmp_path / "m.safetensors"
    sae.save(path)
    loaded = SAE.load(path)
    assert loaded.config == sae.config
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert read_config(path) == sae.config
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded.encode(x, 6).values, sae.encode(x, 6).values)
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temp file"


def _write_raw(path: Path, tensors: dict, config: dict | None, **meta: str) -> None:
    metadata = {"format": FORMAT_NAME, "format_version": "1"}
    if config is not None:
        metadata["config"] = json.dumps(config)
    metadata.update(meta)
    save_file(tensors, str(path), metadata)


def _tensors(sae: SAE) -> dict:
    return {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        SAE.load(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="folder"):
        SAE.load(tmp_path)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _sae().save(good)
    data = good.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            SAE.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError):
        SAE.load(junk)
    pickle_like = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, pickle_like)
    with pytest.raises(ModelFileError):
        SAE.load(pickle_like)


def test_foreign_and_inconsistent_files(tmp_path: Path) -> None:
    sae = _sae()
    tensors, cfg = _tensors(sae), sae.config.to_dict()
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign))
    with pytest.raises(ModelFileError, match="not an hsae-runtime model"):
        SAE.load(foreign)

    cases = {
        "newer": (tensors, cfg, {"format_version": "99"}, "newer"),
        "negative_version": (tensors, cfg, {"format_version": "-3"}, "format_version"),
        "budgets_not_a_list": (tensors, {**cfg, "budgets": 5}, {}, "budgets"),
        "noconfig": (tensors, None, {}, "JSON"),
        "badconfig": (tensors, {**cfg, "k_max": 999}, {}, "k_max"),
        "missing": (
            {k: v for k, v in tensors.items() if k != "b_dec"}, cfg, {}, "expected tensors"
        ),
        "extra": ({**tensors, "threshold": torch.zeros(40)}, cfg, {}, "expected tensors"),
        "shape": ({**tensors, "W_enc": tensors["W_enc"].T.contiguous()}, cfg, {}, "shape"),
        "dtype": ({**tensors, "b_dec": tensors["b_dec"].double()}, cfg, {}, "dtype"),
    }
    for name, (t, c, meta, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write_raw(path, t, c, **meta)
        with pytest.raises(ModelFileError, match=match):
            SAE.load(path)

    nan = dict(tensors)
    nan["W_dec"] = nan["W_dec"].clone()
    nan["W_dec"][3, 3] = float("nan")
    path = tmp_path / "nan.safetensors"
    _write_raw(path, nan, cfg)
    with pytest.raises(ModelFileError, match="NaN"):
        SAE.load(path)
