"""Export an SAE to an ONNX graph with a per-row dynamic budget, and validate what was written.

The graph (opset 17, dynamic ``N``)::

    inputs   x [N, d_in] (float32 or float16), k [N] int64 (each row's budget, 1..k_max)
    outputs  values [N, k_max]          sorted descending, ReLU'd, 0 at positions >= k[row]
             indices [N, k_max] int64   latent ids, -1 at positions >= k[row]
             reconstruction [N, d_in]   b_dec + sum of the row's first k[row] code entries
             reconstructions [N, n_budgets, d_in]   only with ``budgets_out``: one pass,
                                        the fixed budgets in ascending order, ignoring k

Design choices, measured or forced:

- We write the graph node by node with ``onnx.helper`` instead of tracing ``torch.onnx``: the
  budget must stay a graph *input*. The graph takes one ``TopK`` at the constant ``k_max``
  and masks each row's tail with ``Less(arange(k_max), k[:, None])``, which is exact for a
  HierarchicalTopK SAE because its codes are nested prefixes. A per-row ``k`` also keeps the
  batch dimension on every input, which Triton's dynamic batcher needs.
- Decoding is sparse: ``Gather`` of the selected decoder rows, in chunks of ``decode_chunk``
  positions, each chunk contracted with its values by a batched ``MatMul``
  (``[N, 1, c] @ [N, c, d_in]``). Memory stays ``O(N · chunk · d_in)``; no dense ``[N, d_sae]``
  activation and no ``[N, k_max, d_in]`` tensor. Chunks are cut at every ``budgets_out``
  boundary too, so one gather feeds both the per-row and the fixed-budget reconstructions.
- Models whose weights exceed ~2 GB (protobuf's limit) are saved with external data in one
  file next to the graph (``model.onnx.data``); ONNX Runtime finds it when loading by path.
- :func:`export_onnx` always validates what it wrote (``onnx.checker`` full check, then ONNX
  Runtime against the torch SAE at several batch sizes and budgets, see
  :mod:`hsae_runtime.exporters.onnx_validation`) and deletes the files and raises
  :class:`OnnxValidationError`, with the numbers, when the graph disagrees.

The SAE config travels in the model's ``metadata_props`` (``hsae_config``), so a graph alone is
enough for :mod:`hsae_runtime.onnx_backend` to know ``d_in``, ``k_max`` and the budgets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hsae_runtime.checks import check_budgets
from hsae_runtime.errors import ConfigError, HSAEError, InputError
from hsae_runtime.exporters.onnx_format import NP_DTYPES, OnnxDType

if TYPE_CHECKING:
    import onnx

    from hsae_runtime.exporters.onnx_validation import ValidationReport
    from hsae_runtime.sae import SAE

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR that opset 17 shipped with; every ONNX Runtime since 1.13 reads it
GRAPH_FORMAT_VERSION = 1
# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself
EXTERNAL_DATA_THRESHOLD = 1_800_000_000



class OnnxValidationError(HSAEError):
    """An exported graph failed the checker or disagreed with the torch SAE."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    external_data: bool = False
    report: ValidationReport | None = None


# ---------------------------------------------------------------------------------- building
def check_budgets_out(budgets: Sequence[int] | None, k_max: int) -> tuple[int, ...]:
    """Sorted unique fixed budgets in 1..k_max (``()`` for none)."""
    if not budgets:
        return ()
    try:
        return tuple(sorted(set(check_budgets([int(b) for b in budgets], k_max))))
    except InputError as err:
        raise ConfigError(f"budgets_out: {err.message}", hint=err.hint) from err


def build_onnx_model(
    sae: SAE,
    *,
    dtype: OnnxDType = "float32",
    budgets_out: Sequence[int] | None = None,
    reconstruction: bool = True,
    decode_chunk: int = 16,
) -> onnx.ModelProto:
    """The ONNX graph of ``sae`` (weights as initializers). See the module docstring.

    ``reconstruction=False`` leaves out the decoder (an encode-only graph: values, indices).
    """
    from onnx import TensorProto, helper, numpy_helper

    if dtype not in NP_DTYPES:
        raise ConfigError(f"ONNX dtype must be one of {list(NP_DTYPES)}, got {dtype!r}")
    if decode_chunk < 1:
        raise ConfigError(f"decode_chunk must be >= 1, got {decode_chunk}")
    cfg = sae.config
    fixed = check_budgets_out(budgets_out, cfg.k_max)
    np_dtype = NP_DTYPES[dtype]
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16

    def weight(name: str) -> onnx.TensorProto:
        array = getattr(sae, name).detach().to("cpu", torch.float32).numpy().astype(np_dtype)
        return numpy_helper.from_array(array, name)

    inits = [weight("W_enc"), weight("b_enc")]
    if reconstruction or fixed:
        inits += [weight("W_dec"), weight("b_dec")]
    elif cfg.apply_b_dec_to_input:
        inits.append(weight("b_dec"))
    inits += [
        numpy_helper.from_array(np.array([cfg.k_max], dtype=np.int64), "k_max"),
        numpy_helper.from_array(np.arange(cfg.k_max, dtype=np.int64)[None, :], "positions"),
        numpy_helper.from_array(np.array(0, dtype=np_dtype), "zero"),
        numpy_helper.from_array(np.array(-1, dtype=np.int64), "minus_one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
    ]
    nodes: list[onnx.NodeProto] = []
    node = helper.make_node

    x_in = "x"
    if cfg.apply_b_dec_to_input:
        nodes.append(node("Sub", ["x", "b_dec"], ["x_centered"]))
        x_in = "x_centered"
    nodes += [
        node("Gemm", [x_in, "W_enc", "b_enc"], ["pre"]),  # (N, d_sae)
        node("TopK", ["pre", "k_max"], ["top_raw", "top_idx"], axis=-1, largest=1, sorted=1),
        node("Relu", ["top_raw"], ["top_relu"]),  # (N, k_max)
        node("Unsqueeze", ["k", "axis_1"], ["k_col"]),  # (N, 1)
        node("Less", ["positions", "k_col"], ["keep"]),  # (N, k_max)
        node("Where", ["keep", "top_relu", "zero"], ["values"]),
        node("Where", ["keep", "top_idx", "minus_one"], ["indices"]),
    ]
    outputs = [
        helper.make_tensor_value_info("values", elem, ["N", cfg.k_max]),
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", cfg.k_max]),
    ]

    if reconstruction or fixed:
        # Segment ends: every decode_chunk positions and every fixed budget.
        decode_end = cfg.k_max if reconstruction else fixed[-1]
        ends = sorted(set(range(decode_chunk, decode_end, decode_chunk)) | {decode_end}
                      | set(fixed))
        acc_row: str | None = None  # running per-row sum, (N, 1, d_in)
        acc_fixed: str | None = None  # running fixed-budget sum, (N, 1, d_in)
        fixed_names: list[str] = []
        start = 0
        for end in ends:
            s = f"{start}_{end}"
            inits += [
                numpy_helper.from_array(np.array([start], dtype=np.int64), f"start_{s}"),
                numpy_helper.from_array(np.array([end], dtype=np.int64), f"end_{s}"),
            ]
            sl = [f"start_{s}", f"end_{s}", "axis_1"]
            nodes += [
                node("Slice", ["top_idx", *sl], [f"idx_{s}"]),  # (N, c)
                node("Gather", ["W_dec", f"idx_{s}"], [f"rows_{s}"], axis=0),  # (N, c, d_in)
            ]
            for tag, source, use in (
                ("row", "values", reconstruction and end <= cfg.k_max),
                ("fix", "top_relu", bool(fixed) and end <= fixed[-1]),
            ):
                if not use:
                    continue
                nodes += [
                    node("Slice", [source, *sl], [f"v{tag}_{s}"]),
                    node("Unsqueeze", [f"v{tag}_{s}", "axis_1"], [f"v{tag}3_{s}"]),  # (N, 1, c)
                    node("MatMul", [f"v{tag}3_{s}", f"rows_{s}"], [f"part{tag}_{s}"]),
                ]
                prev = acc_row if tag == "row" else acc_fixed
                cur = f"part{tag}_{s}"
                if prev is not None:
                    nodes.append(node("Add", [prev, cur], [f"acc{tag}_{s}"]))
                    cur = f"acc{tag}_{s}"
                if tag == "row":
                    acc_row = cur
                else:
                    acc_fixed = cur
                    if end in fixed:
                        fixed_names.append(cur)
            start = end
        if reconstruction:
            assert acc_row is not None
            nodes += [
                node("Squeeze", [acc_row, "axis_1"], ["row_sum"]),
                node("Add", ["row_sum", "b_dec"], ["reconstruction"]),
            ]
            outputs.append(helper.make_tensor_value_info("reconstruction", elem, ["N", cfg.d_in]))
        if fixed:
            nodes += [
                node("Concat", fixed_names, ["fixed_sum"], axis=1),  # (N, n_budgets, d_in)
                node("Add", ["fixed_sum", "b_dec"], ["reconstructions"]),
            ]
            outputs.append(
                helper.make_tensor_value_info(
                    "reconstructions", elem, ["N", len(fixed), cfg.d_in]
                )
            )

    graph = helper.make_graph(
        nodes,
        "hsae_topk",
        inputs=[
            helper.make_tensor_value_info("x", elem, ["N", cfg.d_in]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["N"]),
        ],
        outputs=outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="hsae-runtime",
        ir_version=IR_VERSION,
        doc_string="HierarchicalTopK SAE: per-row budget k, sorted codes, sparse decode.",
    )
    helper.set_model_props(
        model,
        {
            "hsae_format": "hsae-runtime-onnx",
            "hsae_format_version": str(GRAPH_FORMAT_VERSION),
            "hsae_config": json.dumps(cfg.to_dict()),
            "hsae_dtype": dtype,
            "hsae_budgets_out": json.dumps(list(fixed)),
        },
    )
    return model


# ---------------------------------------------------------------------------------- export
def export_onnx(
    sae: SAE,
    path: str | Path,
    *,
    dtype: OnnxDType = "float32",
    budgets_out: Sequence[int] | None = None,
    external_data: bool | None = None,
    decode_chunk: int = 16,
    validate: bool = True,
) -> OnnxExport:
    """Write ``sae`` as an ONNX graph to ``path`` and validate it.

    ``external_data=None`` picks external data only when the weights pass ~1.8 GB. On a failed
    validation the written files are deleted and :class:`OnnxValidationError` is raised.
    """
    import onnx

    from hsae_runtime.exporters.onnx_validation import validate_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_onnx_model(sae, dtype=dtype, budgets_out=budgets_out, decode_chunk=decode_chunk)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + ".data")
    files = [path]
    if external_data:
        data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_path.name, size_threshold=1024,
        )
        files.append(data_path)
    else:
        onnx.save_model(model, str(path))
    del model
    result = OnnxExport(path=path, files=files, bytes=sum(f.stat().st_size for f in files),
                        external_data=external_data)
    log.info("wrote %s (%.1f MiB%s)", path, result.bytes / 2**20,
             ", external data" if external_data else "")
    if not validate:
        return result
    try:
        onnx.checker.check_model(str(path), full_check=True)
        report = validate_onnx(path, sae, dtype=dtype)
    except Exception as err:
        for f in files:
            f.unlink(missing_ok=True)
        if isinstance(err, OnnxValidationError):
            raise
        raise OnnxValidationError(
            f"the exported graph failed the ONNX checker or could not run: {err}",
            hint="this is a bug in hsae-runtime's exporter; please report it",
        ) from err
    if not report.ok:
        for f in files:
            f.unlink(missing_ok=True)
        raise OnnxValidationError(
            f"ONNX Runtime disagrees with torch: {report.summary()}; nothing was written",
        )
    log.info("validated %s: %s", path.name, report.summary())
    result.report = report
    return result


def size_text(n_bytes: int) -> str:
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.1f} KiB"
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:.1f} MiB"
    return f"{n_bytes / 2**30:.2f} GiB"
