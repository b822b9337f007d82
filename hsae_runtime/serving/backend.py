"""What the server needs from an SAE implementation: the :class:`Backend` protocol.

The batcher only calls ``encode`` (one sorted top-k per batch), ``reconstruct_from_code``
(prefix reconstructions at several budgets) and ``fvu_center``, so any engine that provides
them can serve: :class:`TorchBackend` wraps :class:`~hsae_runtime.sae.SAE`, and
:func:`load_backend` adapts the ONNX engine (``--backend onnx``) when it is installed.

Inputs reaching a backend are already validated (shape, dtype, finite) by
:mod:`hsae_runtime.serving.convert`, so backends do not re-check per request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError
from hsae_runtime.sae import SAE, SparseCode

log = logging.getLogger(__name__)

BackendName = Literal["torch", "onnx"]


class Backend(Protocol):
    """An SAE the server can run. Shapes: ``N`` rows, ``d_in``, ``k``, ``n_budgets``."""

    name: str
    config: SAEConfig
    device: torch.device

    def encode(self, x: Tensor, k: int) -> SparseCode:
        """``x [N, d_in]`` -> sorted code ``values, indices [N, k]``."""
        ...

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        """``code [N, K]`` (indices may hold -1) -> ``[n_budgets, N, d_in]`` (float32)."""
        ...

    def fvu_center(self) -> Tensor:
        """``[d_in]``: the reconstruction of an empty code (``b_dec``), the FVU baseline."""
        ...


class TorchBackend:
    """The reference backend: the PyTorch :class:`SAE`, run under ``inference_mode``."""

    name = "torch"

    def __init__(self, sae: SAE) -> None:
        self.sae = sae.eval()
        self.config = sae.config
        self.device = sae.device
        # One-time packed W_enc on CPU: small batches (what a server sees) run ~3x faster.
        if sae.pack_for_cpu_inference():
            log.info("packed W_enc for CPU inference (oneDNN)")

    def encode(self, x: Tensor, k: int) -> SparseCode:
        with torch.inference_mode():
            return self.sae.encode(x, k)

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        values = code.values.to(device=self.device, dtype=self.sae.dtype)
        indices = code.indices.to(device=self.device, dtype=torch.int64)
        with torch.inference_mode():
            out = self.sae.reconstruct_from_code(SparseCode(values, indices), list(budgets))
        return out.float()

    def fvu_center(self) -> Tensor:
        return self.sae.b_dec.detach().float()


class OnnxBackend:
    """Adapter for :class:`hsae_runtime.onnx_backend.OnnxSAE` (ONNX Runtime sessions)."""

    name = "onnx"

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.config: SAEConfig = sae.config
        self.device: torch.device = sae.device

    def encode(self, x: Tensor, k: int) -> SparseCode:
        return self.sae.encode(x, k)

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        return self.sae.reconstruct_from_code(code, list(budgets)).float()

    def fvu_center(self) -> Tensor:
        # OnnxSAE keeps b_dec private; decoding an all-masked code returns exactly b_dec.
        empty = SparseCode(torch.zeros(1, 1), torch.full((1, 1), -1, dtype=torch.int64))
        return self.sae.decode(empty)[0].float()


def load_backend(
    path: str | Path, *, backend: BackendName = "torch", device: torch.device | str = "cpu"
) -> Backend:
    """Load the model file at ``path`` into the named backend."""
    match backend:
        case "torch":
            return TorchBackend(SAE.load(path, device=device))
        case "onnx":
            return _load_onnx(Path(path), device)
        case other:
            raise ConfigError(f"unknown backend {other!r}", hint="choose torch or onnx")


def _load_onnx(path: Path, device: torch.device | str) -> Backend:
    try:
        import onnxruntime  # noqa: F401

        from hsae_runtime.onnx_backend import OnnxSAE
    except ImportError as err:
        raise ConfigError(
            f"the ONNX backend is not available ({err})",
            hint="install onnxruntime (the `cpu` or `gpu` extra) or use --backend torch",
        ) from err
    providers = None
    if torch.device(device).type == "cpu":
        providers = ["CPUExecutionProvider"]
    # A .onnx file is an exported graph; anything else is our .safetensors model file.
    if path.suffix == ".onnx":
        return OnnxBackend(OnnxSAE.from_onnx(path, providers=providers))
    return OnnxBackend(OnnxSAE.from_model_file(path, providers=providers))
