"""The ``model.py`` of a Triton Python-backend repository (copied there by the exporter).

Triton's Python backend runs this file in a stub process: ``initialize`` loads the SAE named by
the config's ``model_file`` parameter (a path relative to this file's version folder, or an
absolute one) and sets the ``readout`` parameter's readout (default ``encoder``); ``execute``
receives the requests the dynamic batcher grouped and answers each through
:func:`hsae_runtime.exporters.triton_batch.run_batch` (one encode per batch). Bad input
becomes that request's Triton error response (INVALID_ARG: HTTP 400); the model keeps serving.

Tensors cross the stub boundary by DLPack, which carries bfloat16 (NumPy has no bfloat16, so
``as_numpy`` cannot). The stub's Python must import ``hsae_runtime`` and ``torch``:
``hsae-runtime triton up`` arranges that; in NVIDIA's container, ``pip install hsae-runtime``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _to_torch(tensor: Any):
    """A ``pb_utils.Tensor`` as a torch tensor sharing its memory."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


class TritonPythonModel:
    """The entry point Triton's Python backend looks for."""

    def initialize(self, args: dict[str, str]) -> None:
        from hsae_runtime.sae import SAE

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        path = Path(params.get("model_file", "model.safetensors"))
        # KIND_GPU instances get their GPU; KIND_CPU (and Triton's default without a GPU) the CPU
        on_gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
        self.sae = SAE.load(path if path.is_absolute() else here / path, device=device)
        self.sae.requires_grad_(False)
        self.sae.set_readout(params.get("readout", "encoder"))
        self.sae.pack_for_cpu_inference()
        log.info("loaded %s on %s for Triton model %s (%s readout)", path, device,
                 config.get("name"), self.sae.readout)

    def execute(self, requests: list[Any]) -> list[Any]:
        import torch.utils.dlpack
        import triton_python_backend_utils as pb_utils  # provided by the stub

        from hsae_runtime.exporters.triton_batch import BatchRequest, run_batch

        batch: list[BatchRequest] = []
        for request in requests:
            budgets = pb_utils.get_input_tensor_by_name(request, "budgets")
            batch.append(BatchRequest(
                x=_to_torch(pb_utils.get_input_tensor_by_name(request, "x")),
                k=_to_torch(pb_utils.get_input_tensor_by_name(request, "k")),
                budgets=None if budgets is None else _to_torch(budgets),
                outputs=frozenset(request.requested_output_names()),
            ))
        responses = []
        for result in run_batch(self.sae, batch):
            if isinstance(result, Exception):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            tensors = [
                pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t.contiguous()))
                for name, t in result.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        log.info("unloading the SAE")
