"""`hsae-runtime info` and the CLI's error contract (one line, exit code 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hsae_runtime import SAE, SAEConfig


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hsae_runtime.cli", *args], capture_output=True, text=True,
        timeout=120,
    )


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("hsae-runtime ")


def test_info_prints_config(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    SAE(SAEConfig(d_in=8, d_sae=32, k_max=4, hookpoint="model.layers.3")).save(path)
    out = _run("info", str(path))
    assert out.returncode == 0, out.stderr
    assert "d_sae" in out.stdout and "32" in out.stdout and "model.layers.3" in out.stdout
    out = _run("info", str(path), "--json")
    assert json.loads(out.stdout)["k_max"] == 4


def test_info_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    for target in (bad, tmp_path / "missing.safetensors"):
        out = _run("info", str(target))
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr


def _write_model(path: Path, config: dict, version: str = "1", **tensor_overrides) -> None:
    import torch
    from safetensors.torch import save_file

    from hsae_runtime.format import FORMAT_NAME

    sae = SAE(SAEConfig(d_in=8, d_sae=32, k_max=4))
    tensors = {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors.update(tensor_overrides)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    meta = {"format": FORMAT_NAME, "format_version": version, "config": json.dumps(config)}
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path), meta)


_GOOD_CONFIG = {"d_in": 8, "d_sae": 32, "k_max": 4}
BAD_CONFIGS = {
    "budgets_int": ({**_GOOD_CONFIG, "budgets": 5}, "1", "budgets"),
    "budgets_inf": ({**_GOOD_CONFIG, "budgets": [1, float("inf")]}, "1", "budgets"),
    "scale_str": ({**_GOOD_CONFIG, "normalization_scale": "abc"}, "1", "normalization_scale"),
    "scale_list": ({**_GOOD_CONFIG, "normalization_scale": [1]}, "1", "normalization_scale"),
    "negative_version": (_GOOD_CONFIG, "-3", "format_version"),
    "apply_b_dec_str": ({**_GOOD_CONFIG, "apply_b_dec_to_input": "no"}, "1", "apply_b_dec"),
    "hookpoint_int": ({**_GOOD_CONFIG, "hookpoint": 3}, "1", "hookpoint"),
    "d_in_float": ({**_GOOD_CONFIG, "d_in": 8.0}, "1", "d_in"),
}


def _run_here(*args: str, capsys) -> subprocess.CompletedProcess:
    """``hsae-runtime ARGS`` in this process (its start-up dominates a subprocess run)."""
    from hsae_runtime.cli import main

    argv, sys.argv = sys.argv, ["hsae-runtime", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _assert_one_line_exit_2(out: subprocess.CompletedProcess, match: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert match in lines[0] and "hint:" in lines[0], lines[0]


def test_bad_config_values_are_exit_2_for_info_and_serve(tmp_path: Path, capsys) -> None:
    for name, (config, version, match) in BAD_CONFIGS.items():
        path = tmp_path / f"{name}.safetensors"
        _write_model(path, config, version)
        _assert_one_line_exit_2(_run_here("info", str(path), capsys=capsys), match)
    # serve goes through the same validation; a real process, as serve tunes the allocator
    path = tmp_path / "budgets_inf.safetensors"
    out = _run("serve", str(path), "--no-lm", "--port", "0")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "budgets" in out.stderr


def test_info_checks_tensors_against_the_config(tmp_path: Path, capsys) -> None:
    import torch

    good = tmp_path / "good.safetensors"
    _write_model(good, _GOOD_CONFIG)
    out = _run_here("info", str(good), capsys=capsys)
    assert out.returncode == 0, out.stderr
    assert "match the config" in out.stdout

    cases = {
        "shape": ({"W_enc": torch.zeros(32, 8)}, "shape"),
        "dtype": ({"b_dec": torch.zeros(8, dtype=torch.float16)}, "dtype"),
        "missing": ({"b_enc": None}, "expected tensors"),
    }
    for name, (overrides, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write_model(path, _GOOD_CONFIG, **overrides)
        out = _run_here("info", str(path), capsys=capsys)
        assert "MISMATCH" in out.stdout and match in out.stdout, out.stdout
        _assert_one_line_exit_2(out, match)
        _assert_one_line_exit_2(_run_here("info", str(path), "--json", capsys=capsys), match)
