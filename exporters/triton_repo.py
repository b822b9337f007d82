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

Two backends (``backend``):

- ``onnx`` — the layout above (``platform: "onnxruntime_onnx"``), for NVIDIA's container, which
  has the ONNX Runtime backend.
- ``python`` — ``DIR/<name>/1/model.py`` (:mod:`hsae_runtime.exporters.triton_model`) runs the
  SAE through ``hsae_runtime`` in Triton's Python backend, which any ``tritonserver`` has (the
  one bundled in ``nvidia-pytriton`` too). The model file is copied next to it
  (``1/model.safetensors``) or referenced by path (config parameter ``model_file``). Inputs
  ``x`` (float32, float16 or bfloat16), ``k`` and an optional ``budgets`` (per-row fixed
  budgets for ``reconstructions``, ``dims [-1]``); outputs as in
  :mod:`hsae_runtime.exporters.triton_batch`.

Dynamic batching is on unless ``queue_delay_us`` is ``None``. The text is generated here and
checked by parsing it as Triton's ``ModelConfig`` protobuf in the tests (``tritonclient`` ships
``model_config_pb2``) and, for the Python backend, by serving it in a real ``tritonserver``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hsae_runtime.errors import ConfigError
from hsae_runtime.refine import Readout, check_readout

if TYPE_CHECKING:
    from hsae_runtime.exporters.onnx import OnnxDType, OnnxExport
    from hsae_runtime.sae import SAE

log = logging.getLogger(__name__)

InstanceKind = Literal["auto", "cpu", "gpu"]
TritonBackend = Literal["python", "onnx"]
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
MODEL_FILE = "model.safetensors"
"""The model file's name in a Python-backend version folder when it is copied there."""


def _check_common(name: str, max_batch_size: int, queue_delay_us: int | None,
                  instance_count: int) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"Triton model name must be a plain folder name, got {name!r}")
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if queue_delay_us is not None and queue_delay_us < 0:
        raise ConfigError(f"queue_delay_us must be >= 0, got {queue_delay_us}")
    if instance_count < 1:
        raise ConfigError(f"instance_count must be >= 1, got {instance_count}")


def _tensor_lines(tensors: list[tuple[str, str, str]]) -> list[str]:
    """``{ name, data_type, dims... }`` entries, comma-separated; tuples (name, type, rest)."""
    return [f"  {{ name: \"{n}\", data_type: {t}, {rest} }}" + ("," if i < len(tensors) - 1 else "")
            for i, (n, t, rest) in enumerate(tensors)]


def _tail_lines(queue_delay_us: int | None, instance_kind: InstanceKind,
                instance_count: int) -> list[str]:
    """The dynamic batching and instance group blocks."""
    lines = []
    if queue_delay_us is not None:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    match instance_kind:
        case "auto":
            if instance_count != 1:  # Triton's default kind, with a count
                lines.append(f"instance_group [ {{ count: {instance_count} }} ]")
        case "cpu" | "gpu":
            kind = "KIND_CPU" if instance_kind == "cpu" else "KIND_GPU"
            lines.append(f"instance_group [ {{ count: {instance_count}, kind: {kind} }} ]")
        case other:
            raise ConfigError(f"instance_kind must be auto, cpu or gpu, got {other!r}")
    return lines


def _dims(*dims: int) -> str:
    return "dims: [ " + ", ".join(map(str, dims)) + " ]"


def config_pbtxt(
    name: str,
    *,
    d_in: int,
    k_max: int,
    dtype: str = "float32",
    n_budgets_out: int = 0,
    max_batch_size: int = 256,
    queue_delay_us: int | None = 100,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
) -> str:
    """The ``config.pbtxt`` text for the graph of :mod:`hsae_runtime.exporters.onnx`."""
    _check_common(name, max_batch_size, queue_delay_us, instance_count)
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"the ONNX backend takes float32 or float16, got {dtype!r}")
    ttype = _TRITON_TYPES[dtype]
    outputs = [
        ("values", ttype, _dims(k_max)),
        ("indices", "TYPE_INT64", _dims(k_max)),
        ("reconstruction", ttype, _dims(d_in)),
    ]
    if n_budgets_out:
        outputs.append(("reconstructions", ttype, _dims(n_budgets_out, d_in)))
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        *_tensor_lines([("x", ttype, _dims(d_in)),
                        ("k", "TYPE_INT64", _dims(1) + ", reshape: { shape: [ ] }")]),
        "]",
        "output [",
        *_tensor_lines(outputs),
        "]",
        *_tail_lines(queue_delay_us, instance_kind, instance_count),
    ]
    return "\n".join(lines) + "\n"


def python_config_pbtxt(
    name: str,
    *,
    d_in: int,
    k_max: int,
    dtype: str = "float32",
    model_file: str = MODEL_FILE,
    max_batch_size: int = 256,
    queue_delay_us: int | None = 100,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
    readout: Readout = "encoder",
) -> str:
    """The ``config.pbtxt`` text for the Python-backend model (``backend: "python"``);
    ``readout`` other than ``encoder`` becomes the ``readout`` parameter ``model.py`` applies."""
    _check_common(name, max_batch_size, queue_delay_us, instance_count)
    if dtype not in _TRITON_TYPES:
        raise ConfigError(f"dtype must be one of {sorted(_TRITON_TYPES)}, got {dtype!r}")
    ttype = _TRITON_TYPES[dtype]
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        *_tensor_lines([("x", ttype, _dims(d_in)), ("k", "TYPE_INT64", _dims(1)),
                        ("budgets", "TYPE_INT64", _dims(-1) + ", optional: true")]),
        "]",
        "output [",
        *_tensor_lines([("values", ttype, _dims(k_max)), ("indices", "TYPE_INT64", _dims(k_max)),
                        ("reconstruction", ttype, _dims(d_in)),
                        ("reconstructions", ttype, _dims(-1, d_in))]),
        "]",
        *_tail_lines(queue_delay_us, instance_kind, instance_count),
        f'parameters {{ key: "model_file", value: {{ string_value: {json.dumps(model_file)} }} }}',
    ]
    if check_readout(readout) != "encoder":
        lines.append(
            f'parameters {{ key: "readout", value: {{ string_value: {json.dumps(readout)} }} }}'
        )
    return "\n".join(lines) + "\n"


def export_triton_python_repo(
    sae: SAE,
    repo: str | Path,
    *,
    name: str = "hsae",
    dtype: str = "float32",
    model_file: str | Path | None = None,
    max_batch_size: int = 256,
    queue_delay_us: int | None = 100,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
    readout: Readout = "encoder",
) -> tuple[Path, list[Path]]:
    """Write a Python-backend entry ``repo/<name>/`` (config, ``1/model.py``, the model file).

    ``model_file``: an existing hsae-runtime model file to reference by its absolute path
    instead of copying ``sae`` into ``1/model.safetensors`` (the repository then depends on
    that path). ``readout``: how the served codes' values are set, as in ``serve --readout``
    (:mod:`hsae_runtime.refine`). Returns the config path and every file written.
    """
    import shutil

    from hsae_runtime.format import read_config

    version_dir = Path(repo) / name / "1"
    if model_file is not None:
        model_file = Path(model_file).resolve()
        if read_config(model_file) != sae.config:
            raise ConfigError(f"{model_file} is not the model being exported",
                              hint="reference the model file you export, or copy it")
        param = str(model_file)
    else:
        param = MODEL_FILE
    text = python_config_pbtxt(
        name, d_in=sae.config.d_in, k_max=sae.config.k_max, dtype=dtype, model_file=param,
        max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
        instance_kind=instance_kind, instance_count=instance_count, readout=readout,
    )
    version_dir.mkdir(parents=True, exist_ok=True)
    files = [version_dir / "model.py"]
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), files[0])
    if model_file is None:
        files.append(version_dir / MODEL_FILE)
        sae.save(files[-1])
    config_path = version_dir.parent / "config.pbtxt"
    config_path.write_text(text, encoding="utf-8")
    log.info("wrote Triton Python-backend model %s", version_dir.parent)
    return config_path, [config_path, *files]


def export_triton_repo(
    sae: SAE,
    repo: str | Path,
    *,
    name: str = "hsae",
    dtype: OnnxDType = "float32",
    budgets_out: Sequence[int] | None = None,
    max_batch_size: int = 256,
    queue_delay_us: int | None = 100,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
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
        instance_count=instance_count,
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
