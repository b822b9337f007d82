"""hsae-runtime: train, export and serve multi-budget (HierarchicalTopK) sparse autoencoders.

Public API::

    from hsae_runtime import SAE, SAEConfig, SparseCode, hierarchical_topk_loss, topk_loss

    sae = SAE(SAEConfig(d_in=2304, d_sae=16384, k_max=64))
    code = sae.encode(x, 32)                 # sorted top-32 code, [N, 32]
    recons = sae.reconstruct(x, [8, 16, 32]) # [3, N, d_in] from one encode
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hsae_runtime.errors import (
    ConfigError,
    DataError,
    HookpointError,
    HSAEError,
    InputError,
    ModelFileError,
)

if TYPE_CHECKING:
    from hsae_runtime.config import SAEConfig
    from hsae_runtime.loss import hierarchical_topk_loss, topk_loss
    from hsae_runtime.sae import SAE, SparseCode, fvu, per_token_fvu

# torch-backed names load on first use, so `import hsae_runtime` (and the CLI's --help) stays
# light; anything else is an AttributeError as usual.
_LAZY = {
    "SAEConfig": "hsae_runtime.config",
    "hierarchical_topk_loss": "hsae_runtime.loss",
    "topk_loss": "hsae_runtime.loss",
    "SAE": "hsae_runtime.sae",
    "SparseCode": "hsae_runtime.sae",
    "fvu": "hsae_runtime.sae",
    "per_token_fvu": "hsae_runtime.sae",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hsae_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "SAE",
    "SAEConfig",
    "SparseCode",
    "fvu",
    "per_token_fvu",
    "hierarchical_topk_loss",
    "topk_loss",
    "HSAEError",
    "ConfigError",
    "InputError",
    "ModelFileError",
    "HookpointError",
    "DataError",
    "__version__",
]
