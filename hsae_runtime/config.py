"""`SAEConfig`: everything that defines a HierarchicalTopK SAE besides its weights.

The config travels inside the model file (JSON in the safetensors ``__metadata__``), so it holds
only JSON-friendly values. It has no side effects: ``__post_init__`` validates and normalises
(budgets become a sorted tuple) and raises :class:`~hsae_runtime.errors.ConfigError` naming the
field on bad values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from hsae_runtime.errors import ConfigError

DType = Literal["float32", "float16", "bfloat16"]

MAX_WIDTH = 2**31 - 1
"""Largest ``d_in`` / ``d_sae`` / ``k_max``: the wire carries widths and latent ids as int32."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtype names a config, a CLI flag or a folder importer may use, and their torch dtypes."""

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
"""The reverse of :data:`TORCH_DTYPES`: the name a torch dtype is written under."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (a torch dtype passes through); ConfigError on unknown names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint=f"choose one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


@dataclass
class SAEConfig:
    """Shape, budgets and provenance of a HierarchicalTopK SAE."""

    d_in: int
    """Width of the activations the SAE reads (the LM's residual width)."""

    d_sae: int
    """Number of latents (dictionary size)."""

    k_max: int
    """Largest budget: the encoder keeps at most this many latents per token."""

    budgets: tuple[int, ...] | None = None
    """Budgets the loss was trained on (sorted, each in 1..k_max). ``None`` means all 1..k_max."""

    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (SAELens semantics)."""

    dtype: DType = "float32"
    """Storage and compute dtype of the weights."""

    model_name: str | None = None
    """The language model the SAE was trained on (hub id, folder or GGUF path)."""

    hookpoint: str | None = None
    """Where in the LM the SAE reads, e.g. ``model.layers.12`` or ``blocks.12.hook_resid_post``."""

    normalization_scale: float | None = None
    """Scale applied to activations during training (E‖x‖² = d_in); already folded into the
    saved weights, so a loaded SAE works on raw activations. Kept for provenance."""

    training: dict[str, Any] = field(default_factory=dict)
    """Free-form, JSON-serialisable record of how the SAE was trained."""

    def __post_init__(self) -> None:
        # Every field is checked here, for values from Python and from a model file's JSON
        # alike (JSON can carry strings, lists, Infinity or NaN where a number belongs).
        for name in ("d_in", "d_sae", "k_max"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= MAX_WIDTH:
                raise ConfigError(
                    f"SAEConfig.{name} must be a positive int <= {MAX_WIDTH}, got {value!r}",
                    hint="widths and latent ids travel as int32",
                )
            setattr(self, name, int(value))
        if self.k_max > self.d_sae:
            raise ConfigError(
                f"SAEConfig.k_max ({self.k_max}) must be <= d_sae ({self.d_sae})",
                hint="a budget cannot select more latents than the dictionary has",
            )
        self.budgets = self._checked_budgets()
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ConfigError(
                "SAEConfig.apply_b_dec_to_input must be true or false, "
                f"got {self.apply_b_dec_to_input!r}"
            )
        if not isinstance(self.dtype, str) or self.dtype not in get_args(DType):
            raise ConfigError(
                f"SAEConfig.dtype must be one of {list(get_args(DType))}, got {self.dtype!r}"
            )
        for name in ("model_name", "hookpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"SAEConfig.{name} must be a string or null, got {value!r}")
        if self.normalization_scale is not None:
            scale = self.normalization_scale
            if (
                isinstance(scale, bool)
                or not isinstance(scale, numbers.Real)
                or not math.isfinite(scale)
                or scale <= 0
            ):
                raise ConfigError(
                    "SAEConfig.normalization_scale must be a positive finite number or null, "
                    f"got {scale!r}"
                )
            self.normalization_scale = float(scale)
        if not isinstance(self.training, dict):
            raise ConfigError(
                f"SAEConfig.training must be a dict, got {type(self.training).__name__}"
            )

    def _checked_budgets(self) -> tuple[int, ...]:
        """``budgets`` as a sorted tuple of distinct ints in 1..k_max (all of them for None)."""
        if self.budgets is None:
            return tuple(range(1, self.k_max + 1))
        if not isinstance(self.budgets, list | tuple):
            raise ConfigError(
                f"SAEConfig.budgets must be a list of ints or null, got {self.budgets!r}"
            )
        bad_type = [b for b in self.budgets if not _is_int(b)]
        if bad_type:
            raise ConfigError(f"SAEConfig.budgets must be ints, got {bad_type[:5]!r}")
        budgets = sorted({int(b) for b in self.budgets})
        if not budgets:
            raise ConfigError("SAEConfig.budgets must not be empty", hint="or null for 1..k_max")
        bad = [b for b in budgets if not 1 <= b <= self.k_max]
        if bad:
            raise ConfigError(f"SAEConfig.budgets must lie in 1..k_max={self.k_max}, got {bad[:5]}")
        return tuple(budgets)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def trained_budgets(self) -> tuple[int, ...]:
        """The budgets, never ``None`` (normalised in ``__post_init__``)."""
        assert self.budgets is not None
        return self.budgets

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budgets"] = list(self.trained_budgets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build a config from ``to_dict`` output; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"SAE config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown SAE config keys: {unknown}", hint=f"known keys: {sorted(known)}"
            )
        missing = sorted({"d_in", "d_sae", "k_max"} - set(data))
        if missing:
            raise ConfigError(f"SAE config is missing required keys: {missing}")
        kwargs = dict(data)
        if kwargs.get("training") is None:
            kwargs["training"] = {}
        return cls(**kwargs)


def _is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool, float or string."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True
