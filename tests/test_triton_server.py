"""How ``triton up`` finds and prepares the bundled server, without starting it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hsae_runtime.errors import ConfigError
from hsae_runtime.exporters import triton_server
from hsae_runtime.exporters.triton_server import TritonDist, TritonServerError, server_env


def test_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    from hsae_runtime.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    with pytest.raises(TritonServerError) as info:
        triton_server.find_dist()
    assert "not installed" in str(info.value) and "hsae-runtime[triton]" in str(info.value)
    res = CliRunner().invoke(app, ["triton", "up", str(tmp_path)])
    assert isinstance(res.exception, TritonServerError)


def test_up_refuses_a_missing_repository(tmp_path):
    from hsae_runtime.cli import app

    res = CliRunner().invoke(app, ["triton", "up", str(tmp_path / "nowhere")])
    assert isinstance(res.exception, ConfigError)


def test_server_env_puts_our_python_first(tmp_path):
    dist = TritonDist(binary=tmp_path / "bin", backends=tmp_path / "backends",
                      libs=tmp_path / "libs", stub=tmp_path / "stub")
    env = server_env(dist, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert str(dist.libs) in libs and libs[-1] == "/opt/lib"


def test_backend_folder_links_this_pythons_stub(tmp_path):
    (tmp_path / "dist/python").mkdir(parents=True)
    (tmp_path / "dist/python/libtriton_python.so").write_text("lib")
    (tmp_path / "stub").write_text("stub")
    dist = TritonDist(binary=tmp_path / "bin", backends=tmp_path / "dist", libs=tmp_path,
                      stub=tmp_path / "stub")
    backends = triton_server.link_backends(dist, tmp_path / "work")
    python = backends / "python"
    assert (python / "libtriton_python.so").read_text() == "lib"
    assert (python / "triton_python_backend_stub").resolve() == (tmp_path / "stub").resolve()
