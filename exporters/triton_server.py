"""Run the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel, on loopback, for local use.

The wheel (the ``triton`` extra) carries the server binary (``pytriton/tritonserver/bin``), its
Python backend (``backends/python``), one Python-backend stub per Python version
(``python_backend_stubs/<major.minor>/``) and the shared libraries (``nvidia_pytriton.libs``).
:class:`TritonServer` puts them together the way the server expects:

- a private backend folder: ``python/`` holds links to the backend library and its utils and
  the stub built for *this* Python (the backend looks for its stub beside itself);
- ``LD_LIBRARY_PATH``: this Python's own ``libpython`` first (so the stub embeds the same
  interpreter as ours), then the wheel's libraries;
- ``PATH`` starting with this environment's ``bin/``: the embedded interpreter finds
  ``python3`` there, reads its ``pyvenv.cfg`` and so imports from this virtual environment
  (``hsae_runtime``, ``torch``), as pytriton does for its own proxy model;
- HTTP, gRPC and metrics bound to ``host`` (127.0.0.1 by default) on the given ports.

It then polls ``/v2/health/ready`` until the server is ready (or has exited) and stops it with
SIGTERM (SIGKILL after a grace period).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hsae_runtime.errors import ConfigError, HSAEError

log = logging.getLogger(__name__)

INSTALL_HINT = "install the extra: pip install 'hsae-runtime[triton]' (see docs/triton.md)"


class TritonServerError(HSAEError):
    """The bundled Triton server is missing, failed to start, or did not become ready."""


@dataclass(frozen=True)
class TritonDist:
    """Where the parts of the bundled server live."""

    binary: Path
    backends: Path
    libs: Path
    stub: Path


@dataclass(frozen=True)
class TritonPorts:
    """The three ports the server listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def find_dist() -> TritonDist:
    """The bundled server's files; :class:`TritonServerError` with a hint when absent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("the Triton server is not installed", hint=INSTALL_HINT)
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (dist.binary, dist.backends / "python", dist.libs):
        if not path.exists():
            raise TritonServerError(f"the Triton server install is incomplete: {path} is missing",
                                    hint=INSTALL_HINT)
    if not dist.stub.is_file():
        raise TritonServerError(
            f"nvidia-pytriton has no Python-backend stub for Python {version}",
            hint="use a Python version it ships a stub for (see python_backend_stubs/)",
        )
    return dist


def server_env(dist: TritonDist, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``tritonserver`` and its Python-backend stubs (module docstring)."""
    env = dict(os.environ if base is None else base)
    libs = [str(dist.libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and (Path(libdir) / ldlib).exists():
        libs.insert(0, libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def link_backends(dist: TritonDist, folder: Path) -> Path:
    """A backend folder under ``folder`` whose ``python/`` has this Python's stub; returns it."""
    python = folder / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (dist.backends / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    (python / "triton_python_backend_stub").symlink_to(dist.stub)
    return python.parent


class TritonServer:
    """One ``tritonserver`` process serving ``repo`` on ``host`` (a context manager).

    ``extra_args`` go to the server as they are (e.g. ``["--log-verbose=1"]``).
    ``exit_timeout_s``: how long the server drains in-flight requests, open connections and
    model unloads after SIGTERM before it gives up (and exits non-zero).
    """

    def __init__(self, repo: str | Path, *, host: str = "127.0.0.1",
                 ports: TritonPorts = TritonPorts(), extra_args: list[str] | None = None,
                 log_file: str | Path | None = None, exit_timeout_s: int = 10) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ConfigError(f"{repo} is not a folder",
                              hint="pass the model repository that export --triton-repo wrote")
        self.host, self.ports = host, ports
        self.extra_args = list(extra_args or [])
        self.log_file = Path(log_file) if log_file is not None else None
        self.exit_timeout_s = exit_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def command(self, backends: Path) -> list[str]:
        dist = find_dist()
        return [
            str(dist.binary), f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the server process (returns at once; see :meth:`wait_ready`)."""
        dist = find_dist()
        self._workdir = tempfile.TemporaryDirectory(prefix="hsae-triton-")
        backends = link_backends(dist, Path(self._workdir.name))
        cmd = self.command(backends)
        log.info("starting %s", " ".join(cmd))
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(cmd, env=server_env(dist), stdout=out,
                                            stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()

    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 now."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until ready; :class:`TritonServerError` if it exits or times out first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                where = f"; its log: {self.log_file}" if self.log_file else ""
                raise TritonServerError(f"tritonserver exited with code {code} before it was "
                                        f"ready{where}",
                                        hint="a model that fails to load stops the server")
            if self.ready():
                log.info("Triton ready: HTTP %s, gRPC %s, metrics %s:%d", self.http_url,
                         self.grpc_url, self.host, self.ports.metrics)
                return
            time.sleep(0.25)
        self.stop()
        raise TritonServerError(f"tritonserver was not ready after {timeout_s:.0f} s")

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, wait up to ``grace_s`` (default: the exit timeout + 10 s), then SIGKILL;
        returns the exit code."""
        grace_s = self.exit_timeout_s + 10.0 if grace_s is None else grace_s
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", grace_s)
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
