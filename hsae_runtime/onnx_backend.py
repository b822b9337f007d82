"""Run an SAE through ONNX Runtime with the surface the server uses from :class:`~hsae_runtime.SAE`.

``OnnxSAE`` is a drop-in for the parts of ``SAE`` that serving needs::

    sae = OnnxSAE.from_model_file("model.safetensors")   # build the graphs in memory
    sae = OnnxSAE.from_onnx("model.onnx")                # or load an exported graph
    sae.config                      # SAEConfig (from the model file / the graph's metadata)
    sae.providers                   # e.g. ["CPUExecutionProvider"]
    sae.device, sae.dtype, sae.b_dec  # cpu; float32 (float16 graph: float16); [d_in]
    code = sae.encode(x, k)         # x [..., d_in] tensor; k int or per-row [N] tensor
                                    # -> SparseCode(values, indices) as torch tensors (CPU)
    x_hat = sae.decode(code)        # [..., d_in]
    recons = sae.reconstruct_from_code(code, [8, 16, 32])  # code [N, K] -> [n_budgets, N, d_in]
    recons = sae.reconstruct(x, [8, 16, 32])               # one encode -> [n_budgets, ..., d_in]

Semantics, shapes and errors (:class:`~hsae_runtime.errors.InputError`, from the same
:mod:`hsae_runtime.checks` as ``SAE``) match ``SAE``: values
sorted descending; for a per-row k the outputs are ``[..., max(k)]`` with each row's tail masked
to value 0 / index -1. Outputs are float32 CPU tensors (float16 for a float16 graph).

The checked methods above validate, then run the unchecked math, ``top_k_rows`` and
``prefix_decode_rows``, which the server's ``OnnxBackend`` calls directly on requests it has
already validated.

Two sessions: the *encode* graph (``x``, ``k`` -> ``values``, ``indices``; built by
:func:`hsae_runtime.exporters.onnx.build_onnx_model`) and a small *decode* graph
(``values [N, c]``, ``indices [N, c]`` -> ``[N, d_in]`` without ``b_dec``; gathers c decoder
rows). Reconstructions at several budgets are prefix sums of decode-graph segments, as in
``SAE.reconstruct_from_code``. Sessions are thread-safe for concurrent ``run`` calls, and this
class keeps no per-call state.

Providers: ``CPUExecutionProvider`` by default; ``CUDAExecutionProvider`` first when the
``onnxruntime-gpu`` wheel is installed and sees a GPU (the ``gpu`` extra). Pass ``providers=``
to choose.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.checks import (
    check_activation_shape,
    check_budget,
    check_budgets,
    check_code,
    check_row_budgets,
)
from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import InputError, ModelFileError
from hsae_runtime.sae import SparseCode

log = logging.getLogger(__name__)

DECODE_CHUNK = 16  # positions gathered per decode run: memory O(N · chunk · d_in)


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu sees a GPU, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*out, "CPUExecutionProvider"]


def _session(model: bytes | str, providers: Sequence[str] | None, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # Idle ORT workers spin by default; in a process that also runs torch ops (the server, our
    # own input checks) they starve torch's OpenMP threads, so a tiny torch op right after a run
    # waits for them (numbers in docs/benchmarks-core.md). ORT itself does not need the spin.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=opts,
                                providers=list(providers or default_providers()))


def _decode_graph(W_dec: np.ndarray) -> bytes:
    """``values [N, c]``, ``indices [N, c]`` (-1 = masked) -> ``partial [N, d_in]`` (no bias)."""
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if W_dec.dtype == np.float16 else TensorProto.FLOAT
    node = helper.make_node
    inits = [
        numpy_helper.from_array(W_dec, "W_dec"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_i"),
        numpy_helper.from_array(np.array(0, dtype=W_dec.dtype), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
    ]
    nodes = [
        node("Less", ["indices", "zero_i"], ["masked"]),
        node("Where", ["masked", "zero_i", "indices"], ["safe_idx"]),
        node("Where", ["masked", "zero", "values"], ["safe_val"]),
        node("Gather", ["W_dec", "safe_idx"], ["rows"], axis=0),  # (N, c, d_in)
        node("Unsqueeze", ["safe_val", "axis_1"], ["v3"]),  # (N, 1, c)
        node("MatMul", ["v3", "rows"], ["sum3"]),  # (N, 1, d_in)
        node("Squeeze", ["sum3", "axis_1"], ["partial"]),
    ]
    d_in = W_dec.shape[1]
    graph = helper.make_graph(
        nodes, "hsae_decode",
        inputs=[helper.make_tensor_value_info("values", elem, ["N", "c"]),
                helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", "c"])],
        outputs=[helper.make_tensor_value_info("partial", elem, ["N", d_in])],
        initializer=inits,
    )
    from hsae_runtime.exporters.onnx import IR_VERSION, OPSET

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    return model.SerializeToString()


class OnnxSAE:
    """An SAE served by ONNX Runtime sessions (see the module docstring)."""

    def __init__(
        self,
        encoder: bytes | str | Path,
        config: SAEConfig,
        W_dec: np.ndarray,
        b_dec: np.ndarray,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.config = config
        model = encoder if isinstance(encoder, bytes) else str(encoder)
        self._encoder = _session(model, providers, threads)
        self._decoder = _session(_decode_graph(W_dec), providers, threads)
        self._b_dec = torch.from_numpy(np.array(b_dec, copy=True))
        self._np_dtype = W_dec.dtype
        self._tmp: tempfile.TemporaryDirectory | None = None  # holds a >2 GB graph's files
        self.providers: list[str] = list(self._encoder.get_providers())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model_file(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> OnnxSAE:
        """Load an hsae-runtime ``.safetensors`` file and build both graphs in memory."""
        import onnx

        from hsae_runtime.exporters.onnx import EXTERNAL_DATA_THRESHOLD, build_onnx_model
        from hsae_runtime.sae import SAE

        sae = SAE.load(path)
        graph = build_onnx_model(sae, dtype=dtype, reconstruction=False)  # type: ignore[arg-type]
        np_dtype = np.float16 if dtype == "float16" else np.float32
        W_dec = sae.W_dec.detach().float().numpy().astype(np_dtype)
        b_dec = sae.b_dec.detach().float().numpy().astype(np_dtype)
        if sum(len(t.raw_data) for t in graph.graph.initializer) < EXTERNAL_DATA_THRESHOLD:
            return cls(graph.SerializeToString(), sae.config, W_dec, b_dec,
                       providers=providers, threads=threads)
        # protobuf cannot serialise > 2 GiB: go through a graph with external data on disk,
        # kept for the session's lifetime (ORT may map the data file rather than copy it).
        tmp = tempfile.TemporaryDirectory(prefix="hsae-onnx-")
        graph_path = Path(tmp.name) / "encoder.onnx"
        onnx.save_model(graph, str(graph_path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="encoder.onnx.data")
        del graph
        out = cls(graph_path, sae.config, W_dec, b_dec, providers=providers, threads=threads)
        out._tmp = tmp
        return out

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> OnnxSAE:
        """Load a graph written by ``hsae-runtime export --onnx`` (external data included)."""
        import onnx
        from onnx import numpy_helper

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"ONNX graph not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as err:
            raise ModelFileError(f"{path} is not a readable ONNX model ({err})") from err
        props = {p.key: p.value for p in model.metadata_props}
        if props.get("hsae_format") != "hsae-runtime-onnx":
            raise ModelFileError(
                f"{path} is an ONNX model but not one exported by hsae-runtime",
                hint="export it with `hsae-runtime export MODEL.safetensors --onnx OUT.onnx`",
            )
        config = SAEConfig.from_dict(json.loads(props["hsae_config"]))
        weights = {t.name: t for t in model.graph.initializer if t.name in ("W_dec", "b_dec")}
        if set(weights) != {"W_dec", "b_dec"}:
            raise ModelFileError(f"{path} has no decoder weights (an encode-only graph?)")
        W_dec = numpy_helper.to_array(weights["W_dec"])
        b_dec = numpy_helper.to_array(weights["b_dec"])
        del model
        return cls(path, config, W_dec, b_dec, providers=providers, threads=threads)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # outputs are always returned on the CPU

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self._np_dtype == np.float16 else torch.float32

    @property
    def b_dec(self) -> Tensor:
        """``[d_in]``: the reconstruction at budget 0 (the FVU centre). A copy."""
        return self._b_dec.clone()

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Tensor) -> np.ndarray:
        """Validate ``x [..., d_in]``; return it as a contiguous ``[N, d_in]`` numpy array."""
        check_activation_shape(x, self.config.d_in)
        flat = x.detach().reshape(-1, self.config.d_in).to("cpu", self.dtype)
        array = np.ascontiguousarray(flat.numpy())
        if not np.isfinite(array).all():  # numpy: no torch thread pool to wake (see _session)
            raise InputError("x contains NaN or Inf values")
        return array

    def _code_arrays(
        self, code: SparseCode | tuple[Tensor, Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """A checked code as ``[N, k]`` numpy values (this graph's dtype) and int64 indices."""
        val, idx = check_code(
            code[0].detach(), code[1], self.config.d_sae, device=self.device, dtype=self.dtype
        )
        return val.numpy(), idx.numpy()

    # ------------------------------------------------------------------ checked API
    def encode(self, x: Tensor, k: int | Tensor) -> SparseCode:
        """Sorted top-k code of ``x [..., d_in]`` (see ``SAE.encode``)."""
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        flat = self.check_input(x)
        if isinstance(k, Tensor):
            k_rows = check_row_budgets(k, flat.shape[0], self.config.k_max).numpy()
            k_top = int(k_rows.max())
        else:
            k_top = check_budget(k, self.config.k_max)
            k_rows = np.full(flat.shape[0], k_top, dtype=np.int64)
        values, indices = self.top_k_rows(flat, np.ascontiguousarray(k_rows), k_top)
        return SparseCode(values.reshape(*lead, k_top), indices.reshape(*lead, k_top))

    def decode(self, code: SparseCode | tuple[Tensor, Tensor]) -> Tensor:
        """Reconstruction ``[..., d_in]`` of a code ``[..., k]`` (index -1 = masked)."""
        lead = code[0].shape[:-1]
        val, idx = self._code_arrays(code)
        out = self._partial(val, idx) + self._b_dec  # (N, d_in)
        return out.reshape(*lead, self.config.d_in)

    def reconstruct_from_code(self, code: SparseCode, budgets: Sequence[int]) -> Tensor:
        """``code [N, K]`` (sorted, K ≥ max(budgets)) -> ``[n_budgets, N, d_in]`` in given order."""
        budgets = check_budgets(budgets, self.config.k_max)
        val, idx = self._code_arrays(code)
        if max(budgets) > val.shape[1]:
            raise InputError(f"budget {max(budgets)} exceeds the code width {val.shape[1]}")
        return self.prefix_decode_rows(val, idx, budgets)

    def reconstruct(self, x: Tensor, budgets: Sequence[int]) -> Tensor:
        """Reconstructions at several budgets from one encode: ``[n_budgets, ..., d_in]``."""
        budgets = check_budgets(budgets, self.config.k_max)
        lead = x.shape[:-1]
        code = self.encode(x, max(budgets))
        k = code.values.shape[-1]
        flat = SparseCode(code.values.reshape(-1, k), code.indices.reshape(-1, k))
        return self.reconstruct_from_code(flat, budgets).reshape(
            len(budgets), *lead, self.config.d_in
        )

    # ------------------------------------------------------------------ math (no checks)
    def top_k_rows(self, x: np.ndarray, k_rows: np.ndarray, k_top: int) -> SparseCode:
        """The encode graph on checked input: ``x [N, d_in]`` (this graph's dtype), per-row
        budgets ``k_rows [N]`` int64 -> sorted code ``[N, k_top]`` (CPU tensors)."""
        values, indices = (
            np.asarray(a)
            for a in self._encoder.run(["values", "indices"], {"x": x, "k": k_rows})
        )
        return SparseCode(
            torch.from_numpy(values[:, :k_top]), torch.from_numpy(indices[:, :k_top])
        )

    def prefix_decode_rows(
        self, values: np.ndarray, indices: np.ndarray, budgets: Sequence[int]
    ) -> Tensor:
        """Checked code ``[N, K]`` (K ≥ max(budgets)) -> ``[n_budgets, N, d_in]`` in the order
        of ``budgets``: segment sums of the decode graph between consecutive sorted budgets."""
        out: dict[int, Tensor] = {}
        running = self._b_dec.expand(values.shape[0], -1)
        start = 0
        for b in sorted(set(budgets)):
            running = running + self._partial(values[:, start:b], indices[:, start:b])
            out[b] = running
            start = b
        return torch.stack([out[b] for b in budgets])

    def _partial(self, values: np.ndarray, indices: np.ndarray) -> Tensor:
        """Sum of gathered decoder rows for ``[N, c]`` code entries -> ``[N, d_in]``."""
        total: Tensor | None = None
        for s in range(0, values.shape[1], DECODE_CHUNK):
            (part,) = self._decoder.run(
                ["partial"],
                {"values": np.ascontiguousarray(values[:, s:s + DECODE_CHUNK]),
                 "indices": np.ascontiguousarray(indices[:, s:s + DECODE_CHUNK])},
            )
            part = torch.from_numpy(np.asarray(part))
            total = part if total is None else total + part
        assert total is not None
        return total
