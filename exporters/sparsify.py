"""EleutherAI sparsify folders: import TopK sparse coders, export ours in their layout.

A sparsify folder (one per hookpoint, named after it) is ``cfg.json`` (its ``SparseCoderConfig``
fields plus ``d_in``) + ``sae.safetensors`` with ``encoder.weight [d_sae, d_in]`` (an
``nn.Linear``: the transpose of our ``W_enc``), ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]``
and ``b_dec [d_in]``.

Semantics match ours: sparsify subtracts ``b_dec`` from the input (autoencoders, not
transcoders), then takes the top-k of ``relu(x @ W_encᵀ + b)``. The top-k of the ReLU'd
pre-activations has the same values as ReLU of the top-k, so the codes agree (up to the order of
zero-valued entries, and sparsify returns them unsorted).

Refused, because the runtime would compute something else: transcoders (``transcode``), skip
connections (``skip_connection`` / a ``W_skip`` tensor, ``embed_skip``), n-gram lookups
(``gram_lookup``) and the ``groupmax`` activation.

Export writes the core ``SparseCoderConfig`` keys (sparsify loads with extra fields dropped);
our full config also rides in the safetensors metadata (``hsae_config``), so a folder we wrote
round-trips its budgets and provenance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsae_runtime.errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from hsae_runtime.sae import SAE

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
# Flags whose True value changes the function the coder computes.
_REFUSED_FLAGS = {
    "transcode": "a transcoder predicts another module's output, not its input",
    "skip_connection": "a linear skip connection adds x @ W_skipᵀ to the output",
    "embed_skip": "an embedding skip connection adds a term from the model's embeddings",
    "gram_lookup": "an n-gram lookup subtracts a per-context mean the runtime does not have",
}


def sparsify_config(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict sparsify's ``SparseCoder.load_from_disk`` reads."""
    cfg = sae.config
    return {
        "activation": "topk",
        "expansion_factor": max(cfg.d_sae // cfg.d_in, 1),
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,  # wins over expansion_factor when non-zero
        "k": cfg.k_max,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }


def export_sparsify(sae: SAE, folder: str | Path) -> list[Path]:
    """Write ``cfg.json`` and ``sae.safetensors`` into ``folder``; return the paths."""
    from hsae_runtime.format import FORMAT_NAME, FORMAT_VERSION, atomic_save_tensors

    if not sae.config.apply_b_dec_to_input:
        raise ConfigError(
            "sparsify always subtracts b_dec from the input; this SAE has "
            "apply_b_dec_to_input=False and cannot be written as a sparsify folder"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, expected a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": sae.W_enc.detach().T,  # (d_sae, d_in), nn.Linear layout
        "encoder.bias": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    metadata = {
        "hsae_format": FORMAT_NAME,
        "hsae_format_version": str(FORMAT_VERSION),
        "hsae_config": json.dumps(sae.config.to_dict()),
    }
    weights = folder / WEIGHTS_FILE
    atomic_save_tensors(tensors, weights, metadata)
    cfg_path = folder / CFG_FILE
    tmp = cfg_path.with_name(f".{CFG_FILE}.tmp")
    tmp.write_text(json.dumps(sparsify_config(sae), indent=2) + "\n", encoding="utf-8")
    tmp.replace(cfg_path)
    log.info("wrote sparsify folder %s", folder)
    return [cfg_path, weights]


def import_sparsify(
    folder: str | Path,
    *,
    dtype: str | None = None,
    hookpoint: str | None = None,
    model_name: str | None = None,
) -> SAE:
    """Load a sparsify TopK sparse coder folder as an :class:`~hsae_runtime.SAE`.

    The hookpoint defaults to the folder name (sparsify names each coder's folder after it).
    A foreign coder gets budgets ``1..k`` (trained at k only).
    """
    from hsae_runtime.exporters.saelens import build_sae, dtype_name, finish_config, read_json
    from hsae_runtime.format import read_tensors

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"sparsify folder not found: {folder}")
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    for flag, why in _REFUSED_FLAGS.items():
        if cfg.get(flag):
            raise ModelFileError(
                f"{cfg_path}: {flag}=true is not supported ({why})",
                hint="only plain TopK sparse autoencoders can be imported",
            )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ModelFileError(
            f"{cfg_path}: activation={activation!r} is not supported; only 'topk' is",
        )
    k, d_in = cfg.get("k"), cfg.get("d_in")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ModelFileError(f"{cfg_path}: k must be a positive int, got {k!r}")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
        raise ModelFileError(f"{cfg_path}: d_in must be a positive int, got {d_in!r}")
    d_sae = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32))

    weights_path = folder / WEIGHTS_FILE
    raw, meta = read_tensors(
        weights_path, TENSOR_NAMES,
        hint="skip connections (W_skip) are not supported, and a folder saved without a "
        "decoder cannot be imported",
    )

    if meta.get("hsae_config"):
        try:
            config_dict = json.loads(meta["hsae_config"])
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{weights_path}: hsae_config metadata is not JSON") from err
    else:
        config_dict = {
            "d_in": d_in,
            "d_sae": int(d_sae),
            "k_max": k,
            "hookpoint": folder.name,
            "training": {"imported_from": "sparsify", "source": str(folder)},
        }
    config = finish_config(
        config_dict, cfg_path, dtype=dtype, default_dtype=dtype_name(raw["W_dec"]),
        hookpoint=hookpoint, model_name=model_name,
    )
    tensors = {
        "W_enc": raw["encoder.weight"].T,  # (d_in, d_sae)
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    return build_sae(config, tensors, weights_path)
