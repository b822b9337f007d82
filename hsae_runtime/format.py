"""The model file: ONE ``.safetensors`` file is the model.

Layout: the four tensors ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and, in the safetensors ``__metadata__`` (string -> string), the keys

- ``format``: ``"hsae-runtime"`` (anything else is a foreign file),
- ``format_version``: an integer as text (we read versions up to :data:`FORMAT_VERSION`),
- ``config``: the JSON of :class:`~hsae_runtime.config.SAEConfig`.

This module reads and writes ``(SAEConfig, tensors)`` only;
:func:`hsae_runtime.sae.sae_from_tensors` turns them into a module. Reading validates the
header, metadata, tensor names, shapes and dtypes; :func:`validate_tensors` (run for every SAE
built from tensors, whether from a model file or an imported folder) adds finite values.
Problems raise :class:`~hsae_runtime.errors.ModelFileError` with a hint; nothing is ever
unpickled. Writes are atomic (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hsae_runtime.config import DTYPE_NAMES, SAEConfig
from hsae_runtime.errors import ConfigError, ModelFileError

FORMAT_NAME = "hsae-runtime"
FORMAT_VERSION = 1
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# safetensors dtype codes -> the names SAEConfig.dtype uses (others are shown as found)
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_REWRITE_HINT = "the file was edited or written by other software; export the SAE again"
_IMPORT_HINT = (
    "convert SAELens/sparsify folders with `hsae-runtime import FOLDER --out MODEL.safetensors`"
)


def expected_shapes(config: SAEConfig) -> dict[str, tuple[int, ...]]:
    return {
        "W_enc": (config.d_in, config.d_sae),
        "b_enc": (config.d_sae,),
        "W_dec": (config.d_sae, config.d_in),
        "b_dec": (config.d_in,),
    }


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.save_file`` through a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a model file is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(
    path: str | Path, expected: tuple[str, ...], *, hint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read exactly the tensors ``expected`` and the metadata of a safetensors file.

    Missing or extra tensors, a bad header and truncated data all raise :class:`ModelFileError`
    (``hint`` is attached to the name mismatch). Never unpickles.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            problem = _names_problem(f.keys(), expected)
            if problem:
                raise ModelFileError(f"{path}: {problem}", hint=hint)
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in expected}
    except ModelFileError:
        raise
    except Exception as err:  # safetensors raises its own error types for bad files
        raise ModelFileError(
            f"{path}: could not read tensor data ({type(err).__name__}: {err})",
            hint="the file may be truncated or corrupt",
        ) from err
    return tensors, metadata


def write_model(path: str | Path, config: SAEConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write a model file: ``tensors`` (the four :data:`TENSOR_NAMES`) with ``config``."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
    }
    atomic_save_tensors({name: tensors[name] for name in TENSOR_NAMES}, path, metadata)


def read_model(path: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """The config and the four tensors of a model file, header and layout validated.

    Values are checked by :func:`validate_tensors` when an SAE is built from them.
    """
    path = Path(path)
    config, _ = _read_header(path)
    check_tensors(path, config)
    tensors, _ = read_tensors(path, TENSOR_NAMES)
    return config, tensors


def read_config(path: str | Path) -> SAEConfig:
    """Read and validate only the header and config of a model file (no tensor data)."""
    config, _ = _read_header(Path(path))
    return config


def _read_header(path: Path) -> tuple[SAEConfig, dict[str, str]]:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(
            f"{path} is a folder, not a model file",
            hint=_IMPORT_HINT,
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err})",
            hint="the file may be truncated or not a model file",
        ) from err
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is a safetensors file but not an hsae-runtime model "
            f"(format={metadata.get('format')!r})",
            hint=_IMPORT_HINT,
        )
    raw_version = metadata.get("format_version", "")
    if not raw_version.isdecimal() or int(raw_version) < 1:
        raise ModelFileError(
            f"{path}: bad format_version {raw_version!r}: expected a positive integer",
            hint=_REWRITE_HINT,
        )
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has format version {version}, newer than this runtime's {FORMAT_VERSION}",
            hint="upgrade hsae-runtime",
        )
    try:
        config = SAEConfig.from_dict(json.loads(metadata.get("config", "")))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ModelFileError(
            f"{path}: the config metadata is not valid JSON ({err})", hint=_REWRITE_HINT
        ) from err
    except ConfigError as err:
        raise ModelFileError(
            f"{path}: invalid config: {err.message}", hint=err.hint or _REWRITE_HINT
        ) from err
    return config, metadata


def tensor_layout(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype name) of each tensor in a safetensors file, from its header only."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = {}
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = str(piece.get_dtype())
                layout[str(name)] = (
                    tuple(piece.get_shape()),
                    _SAFETENSORS_DTYPES.get(dtype, dtype),
                )
            return layout
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err})",
            hint="the file may be truncated or not a model file",
        ) from err


def tensor_problems(config: SAEConfig, layout: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """What in ``layout`` (see :func:`tensor_layout`) disagrees with ``config``; empty if all
    four tensors are there with the config's shapes and dtype."""
    problem = _names_problem(layout, TENSOR_NAMES)
    if problem:
        return [problem]
    problems = []
    for name, shape in expected_shapes(config).items():
        found_shape, found_dtype = layout[name]
        if found_shape != shape:
            problems.append(f"tensor {name} has shape {found_shape}, the config says {shape}")
        if found_dtype != config.dtype:
            problems.append(
                f"tensor {name} has dtype {found_dtype}, the config says {config.dtype}"
            )
    return problems


def check_tensors(path: str | Path, config: SAEConfig) -> None:
    """Raise :class:`ModelFileError` unless the file's tensors match ``config`` (header only)."""
    problems = tensor_problems(config, tensor_layout(path))
    if problems:
        raise ModelFileError(f"{path}: {'; '.join(problems)}", hint=_REWRITE_HINT)


def _names_problem(found: Iterable[str], expected: tuple[str, ...]) -> str | None:
    names = sorted(found)
    if names != sorted(expected):
        return f"expected tensors {sorted(expected)}, found {names}"
    return None


def validate_tensors(
    config: SAEConfig, tensors: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Raise :class:`ModelFileError` (naming ``source``) unless ``tensors`` are exactly the four
    :data:`TENSOR_NAMES` with ``config``'s shapes and dtype and only finite values."""
    layout = {
        name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")))
        for name, t in tensors.items()
    }
    problems = tensor_problems(config, layout)
    if problems:
        raise ModelFileError(f"{source}: {'; '.join(problems)}")
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{source}: tensor {name} contains NaN or Inf")
