"""hsae-runtime: train, export and serve multi-budget (HierarchicalTopK) sparse autoencoders.

Public API::

    from hsae_runtime import SAE, SAEConfig, SparseCode, hierarchical_topk_loss, topk_loss

    sae = SAE(SAEConfig(d_in=2304, d_sae=16384, k_max=64))
    code = sae.encode(x, 32)                 # sorted top-32 code, [N, 32]
    recons = sae.reconstruct(x, [8, 16, 32]) # [3, N, d_in] from one encode
"""

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import (
    ConfigError,
    DataError,
    HookpointError,
    HSAEError,
    InputError,
    ModelFileError,
)
from hsae_runtime.loss import hierarchical_topk_loss, topk_loss
from hsae_runtime.sae import SAE, SparseCode, fvu, per_token_fvu

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
