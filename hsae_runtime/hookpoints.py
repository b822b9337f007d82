"""Hookpoint names: where an SAE reads the LM, and how a name maps onto a loaded model.

Two vocabularies are accepted: Hugging Face module paths (``model.layers.12`` = the output of
block 12, or any submodule of a block such as ``model.layers.12.mlp``) and the TransformerLens
residual names users know (``blocks.12.hook_resid_post`` = the output of block 12,
``blocks.12.hook_resid_pre`` = its input). :func:`resolve_hookpoint` maps both onto a
:class:`Hookpoint`, which :mod:`hsae_runtime.lm` hooks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from hsae_runtime.errors import HookpointError


@dataclass(frozen=True)
class Hookpoint:
    """Where to read or write in the LM.

    ``module_path`` names a submodule of the loaded model; ``position`` says whether the value
    is that module's output (``"output"``) or the first input of the block (``"input"``,
    TransformerLens ``hook_resid_pre``). ``layer`` is the decoder block the module belongs to.
    """

    name: str
    layer: int
    module_path: str
    position: Literal["output", "input"] = "output"


_TL_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``ModuleList`` named ``layers`` / ``h`` / ``blocks``."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and leaf in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise HookpointError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def valid_hookpoints(model: nn.Module) -> list[str]:
    """The block-level names accepted by :func:`resolve_hookpoint` (submodules also work)."""
    layers_path, layers = find_layers(model)
    names = [f"{layers_path}.{i}" for i in range(len(layers))]
    names += [f"blocks.{i}.hook_resid_{p}" for i in range(len(layers)) for p in ("pre", "post")]
    return names


def resolve_hookpoint(model: nn.Module | Any, name: str) -> Hookpoint:
    """Map a hookpoint name onto ``model`` (an ``nn.Module``, or a
    :class:`~hsae_runtime.lm.LoadedLM` holding one); unknown names raise
    :class:`HookpointError`."""
    if not isinstance(model, nn.Module):
        model = model.model
    layers_path, layers = find_layers(model)
    n = len(layers)
    match = _TL_RESID.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if layer >= n:
            raise HookpointError(
                f"hookpoint {name!r}: layer {layer} does not exist (the model has {n} blocks)",
                hint=f"use blocks.0 .. blocks.{n - 1}",
            )
        position: Literal["output", "input"] = "output" if kind == "post" else "input"
        return Hookpoint(name, layer, f"{layers_path}.{layer}", position)
    modules = dict(model.named_modules())
    if name in modules and name.startswith(layers_path + "."):
        layer = int(name[len(layers_path) + 1 :].split(".", 1)[0])
        return Hookpoint(name, layer, name, "output")
    shown = f"{layers_path}.0 .. {layers_path}.{n - 1}, blocks.<i>.hook_resid_pre|post (i < {n})"
    raise HookpointError(
        f"unknown hookpoint {name!r} for {type(model).__name__}",
        hint=f"valid hookpoints: {shown}, or a submodule path such as {layers_path}.0.mlp",
    )
