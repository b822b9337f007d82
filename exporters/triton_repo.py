"""A Triton Inference Server model repository around the exported ONNX graph.

Layout (Triton's convention)::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx          (+ model.onnx.data for graphs over ~2 GB)

``config.pbtxt`` declares ``platform: "onnxruntime_onnx"``, ``max_batch_size`` and dynamic
batching. With ``max_batch_size > 0`` Triton owns the leading (batch) dimension, so every
tensor's ``dims`` omit it: ``x`` is ``[d_in]`` and the per-row budget ``k`` — a graph input of
shape ``[N]`` — is declared ``dims: [1]`` with ``reshape { shape: [] }``, Triton's idiom for a
per-item scalar. Because every input carries the batch dimension, requests with different
budgets batch together.

The text is generated here and checked by parsing it as Triton's ``ModelConfig`` protobuf in the
tests (``tritonclient`` ships ``model_config_pb2``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hsae_runtime.errors import ConfigError

if TYPE_CHECKING:
    from hsae_runtime.exporters.onnx import OnnxDType, OnnxExport
    from hsae_runtime.sae import SAE

log = logging.getLogger(__name__)

InstanceKind = Literal["auto", "cpu", "gpu"]
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def config_pbtxt(
    name: str,
    *,
    d_in: int,
    k_max: int,
    dtype: str = "float32",
    n_budgets_out: int = 0,
    max_batch_size: int = 256,
    queue_delay_us: int = 100,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
) -> str:
    """The ``config.pbtxt`` text for the graph of :mod:`hsae_runtime.exporters.onnx`."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"Triton model name must be a plain folder name, got {name!r}")
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if queue_delay_us < 0:
        raise ConfigError(f"queue_delay_us must be >= 0, got {queue_delay_us}")
    ttype = _TRITON_TYPES[dtype]
    outputs = [
        ("values", ttype, [k_max]),
        ("indices", "TYPE_INT64", [k_max]),
        ("reconstruction", ttype, [d_in]),
    ]
    if n_budgets_out:
        outputs.append(("reconstructions", ttype, [n_budgets_out, d_in]))
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        f'  {{ name: "x", data_type: {ttype}, dims: [ {d_in} ] }},',
        '  { name: "k", data_type: TYPE_INT64, dims: [ 1 ], reshape: { shape: [ ] } }',
        "]",
        "output [",
    ]
    for i, (out, t, dims) in enumerate(outputs):
        sep = "," if i < len(outputs) - 1 else ""
        dims_text = ", ".join(map(str, dims))
        lines.append(f'  {{ name: "{out}", data_type: {t}, dims: [ {dims_text} ] }}{sep}')
    lines += [
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
    ]
    match instance_kind:
        case "auto":
            pass  # Triton puts the model on every GPU it has, else on the CPU
        case "cpu" | "gpu":
            kind = "KIND_CPU" if instance_kind == "cpu" else "KIND_GPU"
            lines.append(f"instance_group [ {{ count: {instance_count}, kind: {kind} }} ]")
        case other:
            raise ConfigError(f"instance_kind must be auto, cpu or gpu, got {other!r}")
    return "\n".join(lines) + "\n"


def export_triton_repo(
    sae: SAE,
    repo: str | Path,
    *,
    name: str = "hsae",
    dtype: OnnxDType = "float32",
    budgets_out: Sequence[int] | None = None,
    max_batch_size: int = 256,
    queue_delay_us: int = 100,
    instance_kind: InstanceKind = "auto",
    validate: bool = True,
    reuse: OnnxExport | None = None,
) -> tuple[Path, OnnxExport]:
    """Write ``repo/<name>/config.pbtxt`` and ``repo/<name>/1/model.onnx`` (validated).

    ``reuse``: a graph :func:`~hsae_runtime.exporters.onnx.export_onnx` already wrote and
    validated with the same ``dtype`` and ``budgets_out``; it is copied instead of rebuilt (an
    external data file keeps its name, which the graph refers to). Returns the config path and
    the :class:`~hsae_runtime.exporters.onnx.OnnxExport` of the repository's graph.
    """
    import shutil

    from hsae_runtime.exporters.onnx import OnnxExport, check_budgets_out, export_onnx

    fixed = check_budgets_out(budgets_out, sae.config.k_max)
    text = config_pbtxt(
        name, d_in=sae.config.d_in, k_max=sae.config.k_max, dtype=dtype,
        n_budgets_out=len(fixed), max_batch_size=max_batch_size,
        queue_delay_us=queue_delay_us, instance_kind=instance_kind,
    )
    model_dir = Path(repo) / name
    target = model_dir / "1" / "model.onnx"
    if reuse is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        files = [target]
        shutil.copyfile(reuse.path, target)
        for extra in reuse.files[1:]:
            files.append(target.parent / extra.name)
            shutil.copyfile(extra, files[-1])
        exported = OnnxExport(path=target, files=files, bytes=reuse.bytes,
                              external_data=reuse.external_data, report=reuse.report)
    else:
        exported = export_onnx(sae, target, dtype=dtype, budgets_out=fixed, validate=validate)
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(text, encoding="utf-8")
    log.info("wrote Triton model repository entry %s", model_dir)
    return config_path, exported
