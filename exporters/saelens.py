"""SAELens folders: export an SAE that ``sae_lens.SAE.load_from_disk`` loads, and import TopK ones.

A SAELens folder is ``cfg.json`` + ``sae_weights.safetensors`` holding exactly ``W_enc [d_in,
d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` (the same names and orientation as ours,
so no transposes). What SAELens 6.54 requires of ``cfg.json`` was measured and is recorded in
``shared/SAELENS.md``; the parts that shape this module:

- ``architecture`` must be lower-case ``"topk"``; ``k`` is silently defaulted to 100 when
  missing, so we always write it (our ``k_max``: SAELens encodes at one fixed k).
- Only with ``metadata.sae_lens_version`` present do extra keys inside ``metadata`` survive
  loading, so ours (``hook_name``, ``model_name``, ``budgets`` and the full hsae config under
  ``hsae_runtime``) live there, and unknown top-level keys would be dropped anyway.

Import accepts SAELens ≥ 6 TopK folders and the pre-6 layout (``architecture: "standard"`` with
``activation_fn_str: "topk"``); anything else (ReLU, JumpReLU, gated, BatchTopK-as-JumpReLU,
normalised activations) is refused with :class:`~hsae_runtime.errors.ModelFileError`, because
its encoder is not a plain TopK and the runtime would silently compute something else.
``rescale_acts_by_decoder_norm: true`` is folded into the weights instead (exact: with
``n = ‖W_dec[i]‖``, SAELens selects on ``pre · n`` and decodes ``acts / n``, which is a plain
TopK SAE with ``W_enc · n``, ``b_enc · n`` and ``W_dec / n``; its codes are unchanged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsae_runtime.errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from hsae_runtime.config import SAEConfig
    from hsae_runtime.sae import SAE

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAE_LENS_VERSION = "6.0.0"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def saelens_config(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens needs for ``sae`` (see the module docstring)."""
    from hsae_runtime.format import FORMAT_NAME, FORMAT_VERSION

    cfg = sae.config
    return {
        "architecture": "topk",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k_max,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "hook_name": cfg.hookpoint,
            "model_name": cfg.model_name,
            "budgets": list(cfg.trained_budgets),
            "hsae_runtime": {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "config": cfg.to_dict(),
            },
        },
    }


def export_saelens(sae: SAE, folder: str | Path) -> list[Path]:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``folder``; return the paths."""
    from hsae_runtime.format import atomic_save_tensors

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--saelens must name a folder, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    atomic_save_tensors({name: getattr(sae, name) for name in TENSOR_NAMES}, weights)
    cfg_path = folder / CFG_FILE
    tmp = cfg_path.with_name(f".{CFG_FILE}.tmp")
    tmp.write_text(json.dumps(saelens_config(sae), indent=2) + "\n", encoding="utf-8")
    tmp.replace(cfg_path)
    log.info("wrote SAELens folder %s", folder)
    return [cfg_path, weights]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path} not found", hint="is this the right folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} must hold a JSON object")
    return data


def _topk_k(cfg: dict[str, Any], path: Path) -> int:
    """k of a TopK SAELens config (6.x or the pre-6 layout), or raise naming what it is."""
    arch = cfg.get("architecture")
    if arch == "topk":
        k = cfg.get("k", 100)  # SAELens's own default when the key is missing
    elif arch in (None, "standard") and str(cfg.get("activation_fn_str", cfg.get(
            "activation_fn", ""))).lower() == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = kwargs.get("k", cfg.get("k"))
    else:
        what = arch if arch is not None else cfg.get("activation_fn_str", "unknown")
        raise ModelFileError(
            f"{path} is a SAELens {what!r} SAE; only TopK SAEs can be imported",
            hint="hsae-runtime runs TopK codes; a ReLU/JumpReLU/gated encoder is a different "
            "function and would be computed wrongly",
        )
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ModelFileError(f"{path}: TopK k must be a positive int, got {k!r}")
    return k


def import_saelens(
    folder: str | Path,
    *,
    dtype: str | None = None,
    hookpoint: str | None = None,
    model_name: str | None = None,
) -> SAE:
    """Load a SAELens TopK folder as an :class:`~hsae_runtime.SAE`.

    A folder we exported round-trips exactly (budgets, provenance). For a foreign folder the
    budgets are ``1..k`` — a plain TopK SAE was trained at k only, so smaller budgets are
    usable but not trained; ``hsae-runtime info`` shows them.
    """
    from hsae_runtime.format import read_tensors

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"SAELens folder not found: {folder}")
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    k = _topk_k(cfg, cfg_path)
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise ModelFileError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported",
            hint="the SAE expects rescaled activations; fold the scale into the weights and "
            "save with normalize_activations='none' first",
        )
    metadata = cfg.get("metadata") or {}
    ours = metadata.get("hsae_runtime") if isinstance(metadata, dict) else None
    if isinstance(ours, dict) and isinstance(ours.get("config"), dict):
        config_dict = dict(ours["config"])
    else:
        config_dict = {
            "d_in": cfg.get("d_in"),
            "d_sae": cfg.get("d_sae"),
            "k_max": k,
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
            "model_name": metadata.get("model_name", cfg.get("model_name")),
            "hookpoint": metadata.get("hook_name", cfg.get("hook_name")),
            "training": {"imported_from": "saelens", "source": str(folder)},
        }
    weights_path = folder / WEIGHTS_FILE
    tensors, _ = read_tensors(
        weights_path, TENSOR_NAMES,
        hint="extra tensors (thresholds, scaling factors) mean a non-TopK SAE",
    )
    if cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norm(tensors, weights_path)
        config_dict.setdefault("training", {})["folded_decoder_norm"] = True
    config = finish_config(
        config_dict, cfg_path, dtype=dtype, default_dtype=dtype_name(tensors["W_enc"]),
        hookpoint=hookpoint, model_name=model_name,
    )
    return build_sae(config, tensors, weights_path)


def finish_config(
    config_dict: dict[str, Any], cfg_path: Path, *, dtype: str | None, default_dtype: str,
    hookpoint: str | None, model_name: str | None,
) -> SAEConfig:
    """Apply the importer's overrides to a folder's config and validate it.

    dtype: the caller's override, else the folder's own, else ``default_dtype`` (the tensors').
    """
    from hsae_runtime.config import SAEConfig

    config_dict["dtype"] = dtype or config_dict.get("dtype") or default_dtype
    if hookpoint is not None:
        config_dict["hookpoint"] = hookpoint
    if model_name is not None:
        config_dict["model_name"] = model_name
    try:
        return SAEConfig.from_dict(config_dict)
    except ConfigError as err:
        raise ModelFileError(f"{cfg_path}: {err.message}", hint=err.hint) from err


def _fold_decoder_norm(tensors: dict[str, Any], source: Path) -> None:
    """Fold SAELens's ``rescale_acts_by_decoder_norm`` into the weights (module docstring)."""
    W_dec = tensors["W_dec"].float()
    norms = W_dec.norm(dim=-1)  # (d_sae,)
    if not bool((norms > 0).all()):
        raise ModelFileError(
            f"{source}: rescale_acts_by_decoder_norm with zero-norm decoder rows cannot be folded"
        )
    dtype = tensors["W_dec"].dtype
    tensors["W_enc"] = (tensors["W_enc"].float() * norms).to(dtype)
    tensors["b_enc"] = (tensors["b_enc"].float() * norms).to(dtype)
    tensors["W_dec"] = (W_dec / norms[:, None]).to(dtype)


def dtype_name(t: Any) -> str:
    """The config dtype name of tensor ``t``; ModelFileError for other dtypes."""
    from hsae_runtime.config import DTYPE_NAMES

    if t.dtype not in DTYPE_NAMES:
        raise ModelFileError(f"unsupported weight dtype {t.dtype}")
    return DTYPE_NAMES[t.dtype]


def build_sae(config: SAEConfig, tensors: dict[str, Any], source: Path) -> SAE:
    """An SAE from ``{W_enc, b_enc, W_dec, b_dec}`` in our orientation, cast to the config's
    dtype and validated (:func:`~hsae_runtime.format.validate_tensors`)."""
    from hsae_runtime.sae import sae_from_tensors

    cast = {name: t.to(config.torch_dtype).contiguous() for name, t in tensors.items()}
    return sae_from_tensors(config, cast, source=source)
