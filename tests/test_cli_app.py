"""The CLI's entry: every verb registered, and ``--help`` without torch or transformers."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner


def test_cli_import_loads_no_heavy_modules():
    code = ("import sys, hsae_runtime.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'grpc', 'onnxruntime', 'numba') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_verb_is_registered():
    from hsae_runtime.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("train", "eval", "export", "serve", "encode", "info"):
        assert verb in result.output


def test_package_root_is_lazy_but_complete():
    import hsae_runtime

    assert hsae_runtime.SAE.__name__ == "SAE"
    assert callable(hsae_runtime.hierarchical_topk_loss)
    try:
        hsae_runtime.not_a_name  # noqa: B018
    except AttributeError as err:
        assert "not_a_name" in str(err)
    else:
        raise AssertionError("unknown attributes must raise AttributeError")


def test_parse_budgets_is_shared_and_names_the_flag():
    import pytest

    from hsae_runtime.cli.common import parse_budgets
    from hsae_runtime.errors import ConfigError

    assert parse_budgets("8, 16,,32") == [8, 16, 32]
    assert parse_budgets(None) is None and parse_budgets(" ") is None
    with pytest.raises(ConfigError, match="--budgets-out"):
        parse_budgets("1,x", "--budgets-out")


def test_include_special_flag_and_its_hidden_deprecated_alias(monkeypatch):
    import hsae_runtime.training.trainer as trainer
    from hsae_runtime.cli import app

    seen = []

    def fake_train(cfg, *args, **kwargs):
        seen.append(cfg.include_special)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(trainer, "train", fake_train)
    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "--include-special" in help_text and "--keep-special" not in help_text
    base = ["train", "--lm", "x", "--data", "d.txt", "--out", "o.safetensors",
            "--hookpoint", "model.layers.0", "--d-sae", "16", "--k-max", "4"]
    for extra in (["--include-special"], ["--keep-special"], []):
        runner.invoke(app, base + extra)
    assert seen == [True, True, False]
