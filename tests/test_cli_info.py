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
