"""What an hsae-runtime ONNX graph holds besides its nodes: the weight dtypes it may use and the
``metadata_props`` it carries (read without loading the weights).

Shared by the graph builder (:mod:`hsae_runtime.exporters.onnx`) and its validation
(:mod:`hsae_runtime.exporters.onnx_validation`), so neither imports the other's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import onnx

OnnxDType = Literal["float32", "float16"]
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
"""The graph's weight dtype names and their numpy dtypes."""


def graph_metadata(model_or_path: onnx.ModelProto | str | Path) -> dict[str, str]:
    """The ``metadata_props`` of a graph written by :func:`build_onnx_model` (no weights read)."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    else:
        model = model_or_path
    return {p.key: p.value for p in model.metadata_props}
