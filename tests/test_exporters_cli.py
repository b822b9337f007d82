"""``hsae-runtime export`` / ``import``: every target from one command, and clean errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.cli import app

pytest.importorskip("onnxruntime")

runner = CliRunner()


@pytest.fixture
def model(tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=48, k_max=6, hookpoint="blocks.1.hook_resid_post"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    path = tmp_path / "m.safetensors"
    sae.save(path)
    return sae, path


def test_export_everything_then_import(model, tmp_path):
    sae, path = model
    res = runner.invoke(app, [
        "export", str(path), "--onnx", str(tmp_path / "m.onnx"), "--budgets-out", "2,4",
        "--triton-repo", str(tmp_path / "repo"), "--triton-backend", "onnx", "--triton-name", "sae",
        "--max-batch-size", "8",
        "--queue-delay-us", "50", "--safetensors", str(tmp_path / "copy.safetensors"),
        "--saelens", str(tmp_path / "lens"), "--sparsify", str(tmp_path / "spars"),
    ])
    assert res.exit_code == 0, res.output
    summary = res.output.strip().splitlines()[-1]
    assert summary.startswith("exported: onnx") and "max rel err" in summary
    assert (tmp_path / "repo" / "sae" / "1" / "model.onnx").is_file()
    assert "max_queue_delay_microseconds: 50" in (tmp_path / "repo/sae/config.pbtxt").read_text()
    for folder in ("lens", "spars"):
        out = tmp_path / f"{folder}.safetensors"
        res = runner.invoke(app, ["import", str(tmp_path / folder), "--out", str(out)])
        assert res.exit_code == 0, res.output
        back = SAE.load(out)
        assert back.config == sae.config and torch.equal(back.W_enc, sae.W_enc)
    # a folder is accepted as the export source too
    res = runner.invoke(app, ["export", str(tmp_path / "lens"), "--onnx", str(tmp_path / "l.onnx")])
    assert res.exit_code == 0, res.output


def test_user_errors_are_one_line(model, tmp_path):
    from hsae_runtime.errors import HSAEError

    _, path = model
    for args in (["export", str(path)],
                 ["export", str(path), "--onnx", "o.onnx", "--dtype", "int8"],
                 ["export", str(path), "--onnx", "o.onnx", "--budgets-out", "1,x"],
                 ["import", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]):
        res = runner.invoke(app, args)
        assert res.exit_code != 0
        assert isinstance(res.exception, HSAEError), (args, res.exception)
