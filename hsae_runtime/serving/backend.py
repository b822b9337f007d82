"""What the server needs from an SAE engine: the :class:`Backend` protocol and its two
implementations, which share everything but the math.

The batcher calls ``encode`` (one sorted top-k per batch), ``reconstruct_from_code`` (prefix
reconstructions at several budgets, for Encode's extras and for Decode) and ``fvu_center``.
:class:`EngineBackend` implements the protocol once - device and dtype conversion,
``inference_mode``, float32 outputs, the FVU centre ``b_dec`` - over two math steps a subclass
provides: :class:`TorchBackend` (:class:`~hsae_runtime.sae.SAE`'s encoder and the prefix-decode
kernel) and :class:`OnnxBackend` (the sessions of
:class:`~hsae_runtime.onnx_backend.OnnxSAE`, ``--backend onnx``).

Inputs reaching a backend are validated once, on the wire, before they are queued
(:mod:`hsae_runtime.serving.convert`: shapes, dtypes, finiteness, budgets, latent ids), so
backends run the engines' unchecked math and never re-check a request.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError
from hsae_runtime.kernels.prefix_decode import prefix_decode
from hsae_runtime.refine import Readout, check_readout
from hsae_runtime.sae import SAE, SparseCode

if TYPE_CHECKING:
    from hsae_runtime.onnx_backend import OnnxSAE

log = logging.getLogger(__name__)

BackendName = Literal["torch", "onnx"]


class Backend(Protocol):
    """An SAE the server can run. Shapes: ``N`` rows, ``d_in``, ``k``, ``n_budgets``."""

    name: str
    config: SAEConfig
    device: torch.device
    dtype: torch.dtype
    """The dtype ``encode`` takes its rows in."""

    def encode(self, x: Tensor, k: int) -> SparseCode:
        """Validated ``x [N, d_in]`` (``dtype``, on ``device``) -> sorted code ``[N, k]``."""
        ...

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        """Validated ``code [N, K]`` (indices may hold -1; budgets each ≤ K) ->
        ``[n_budgets, N, d_in]`` float32, in the order of ``budgets``."""
        ...

    def fvu_center(self) -> Tensor:
        """``[d_in]`` float32: the reconstruction of an empty code (``b_dec``), the FVU
        baseline."""
        ...


class EngineBackend(ABC):
    """:class:`Backend` over an engine's two unchecked math steps (:meth:`_top_k`,
    :meth:`_prefix_decode`), which run under ``inference_mode`` on ``device``."""

    name: str

    def __init__(
        self, config: SAEConfig, device: torch.device, dtype: torch.dtype, b_dec: Tensor
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self._center = b_dec.detach().float().to(device)  # (d_in,)

    def encode(self, x: Tensor, k: int) -> SparseCode:
        with torch.inference_mode():
            return self._top_k(x.to(self.device, self.dtype), k)

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        values = code.values.to(device=self.device, dtype=self.dtype)  # (N, K)
        indices = code.indices.to(device=self.device, dtype=torch.int64)  # (N, K)
        with torch.inference_mode():
            return self._prefix_decode(values, indices, list(budgets)).float()

    def fvu_center(self) -> Tensor:
        return self._center

    @abstractmethod
    def _top_k(self, x: Tensor, k: int) -> SparseCode:
        """``x [N, d_in]`` -> sorted code ``[N, k]``."""

    @abstractmethod
    def _prefix_decode(self, values: Tensor, indices: Tensor, budgets: list[int]) -> Tensor:
        """``values, indices [N, K]`` -> ``[n_budgets, N, d_in]`` in the order of ``budgets``."""


class TorchBackend(EngineBackend):
    """The reference backend: the PyTorch :class:`SAE`'s encoder and prefix-decode kernel."""

    def __init__(self, sae: SAE) -> None:
        self.sae = sae.eval()
        # What Info reports: the readout shows, since refined codes differ from every export's.
        self.name = "torch" if sae.readout == "encoder" else f"torch+{sae.readout}"
        super().__init__(sae.config, sae.device, sae.dtype, sae.b_dec)
        # A one-time packed W_enc on CPU makes small batches (what a server sees) faster.
        if sae.pack_for_cpu_inference():
            log.info("packed W_enc for CPU inference (oneDNN)")

    def _top_k(self, x: Tensor, k: int) -> SparseCode:
        return self.sae.code_rows(x, k)  # (N, k), under the SAE's readout

    def _prefix_decode(self, values: Tensor, indices: Tensor, budgets: list[int]) -> Tensor:
        return prefix_decode(values, indices, self.sae.W_dec, self.sae.b_dec, budgets)


class OnnxBackend(EngineBackend):
    """The ONNX Runtime backend: :class:`~hsae_runtime.onnx_backend.OnnxSAE`'s sessions (CPU
    tensors in and out; the graph's dtype is float32 or float16)."""

    name = "onnx"

    def __init__(self, sae: OnnxSAE) -> None:
        self.sae = sae
        super().__init__(sae.config, sae.device, sae.dtype, sae.b_dec)

    def _top_k(self, x: Tensor, k: int) -> SparseCode:
        rows = np.ascontiguousarray(x.numpy())  # (N, d_in)
        return self.sae.top_k_rows(rows, np.full(rows.shape[0], k, dtype=np.int64), k)

    def _prefix_decode(self, values: Tensor, indices: Tensor, budgets: list[int]) -> Tensor:
        return self.sae.prefix_decode_rows(values.numpy(), indices.numpy(), budgets)


def load_backend(
    path: str | Path, *, backend: BackendName = "torch", device: torch.device | str = "cpu",
    readout: Readout = "encoder",
) -> Backend:
    """Load the model file at ``path`` into the named backend (``readout``: torch only)."""
    if check_readout(readout) != "encoder" and backend != "torch":
        raise ConfigError(f"readout {readout!r} exists in the torch backend only",
                          hint="serve with --backend torch, or drop --readout")
    match backend:
        case "torch":
            return TorchBackend(SAE.load(path, device=device).set_readout(readout))
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
