"""Shared pieces of the serving benchmarks: a real `hsae-runtime serve` process, machine line.

Used by ``bench_serving.py`` and ``serving_load.py`` (run ``bench_serving.py``; this module has
no entry point).
"""

from __future__ import annotations

import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import torch

from hsae_runtime.config import SAEConfig
from hsae_runtime.sae import SAE

D_IN, D_SAE, K_MAX = 2304, 16384, 64


class ServerProcess:
    def __init__(self, model: Path, *extra: str, lm: bool = False) -> None:
        cmd = [sys.executable, "-m", "hsae_runtime.cli", "serve", str(model),
               "--port", "0", "--device", "cpu", *extra, *([] if lm else ["--no-lm"])]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        return self.memory()["VmRSS"]

    def memory(self) -> dict[str, int]:
        """Bytes of ``VmRSS`` and its parts ``RssAnon`` (heap) and ``RssFile`` (mapped files)."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
        if "VmRSS" not in out:
            raise RuntimeError("no VmRSS")
        return out

    def threads(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise RuntimeError("no Threads")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code; prints the server's last log lines if it hangs."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print("server did not exit; its log ends with:\n" + "".join(self.log[-20:]))
            raise


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), grpcio {grpc.__version__}, "
        f"Python {platform.python_version()}"
    )


def lm_sae(folder: Path) -> Path | None:
    """A random SAE for Gemma-3 270M's layer 6 (d_in 640), or None without the GGUF package."""
    try:
        from hsae_runtime.gguf import gemma3_270m_path

        gguf = gemma3_270m_path()
    except Exception as err:  # noqa: BLE001 - the LM rows are optional
        print(f"(skipping the LM rows: {err})")
        return None
    config = SAEConfig(
        d_in=640, d_sae=4096, k_max=K_MAX, model_name=str(gguf), hookpoint="model.layers.6"
    )
    path = folder / "gemma3.safetensors"
    SAE(config).save(path)
    return path


def pct(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile of already sorted values (NaN for none)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def lm_vocab_size(model: Path) -> int:
    """The vocabulary size of the LM named by the SAE file ``model`` (its config.json)."""
    import json

    from hsae_runtime.format import read_config
    from hsae_runtime.gguf import dequantised_folder

    model_name = read_config(model).model_name
    if model_name is None:
        raise ValueError(f"{model} names no LM")
    name = Path(model_name)
    folder = dequantised_folder(name, None) if name.suffix == ".gguf" else name
    return int(json.loads((folder / "config.json").read_text())["vocab_size"])
