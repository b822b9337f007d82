"""``TrainConfig``: everything a training run depends on, validated on construction.

:func:`hsae_runtime.training.trainer.train` takes one; the CLI ``hsae-runtime train`` fills it
from flags. Every invalid field raises :class:`~hsae_runtime.errors.ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hsae_runtime.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI fills it from flags)."""

    lm: str
    """Hub id, local folder or .gguf file of the language model."""
    hookpoint: str
    """Where the SAE reads, e.g. ``model.layers.6`` or ``blocks.6.hook_resid_post``."""
    data: str
    """Training text: .txt / .jsonl file or ``hf:NAME[:CONFIG][:SPLIT]``."""
    d_sae: int
    """Number of latents."""
    k_max: int
    """Largest budget (the encoder's top-k)."""
    out: str = "sae.safetensors"
    """Where the trained model file is written."""
    objective: Literal["hierarchical", "topk"] = "hierarchical"
    """``hierarchical``: mean loss over ``budgets``; ``topk``: the loss at ``k`` only."""
    k: int | None = None
    """Budget for the ``topk`` objective (default ``k_max``)."""
    budgets: tuple[int, ...] | None = None
    """Budgets of the hierarchical loss (default all 1..k_max)."""
    tokens: int = 1_000_000
    """Training tokens (across all ranks and epochs)."""
    batch_tokens: int = 1024
    """Tokens per optimiser step (global, split over ranks)."""
    lr: float | Literal["auto"] = "auto"
    """Peak Adam learning rate; ``auto`` applies :func:`auto_lr` (scaled by width)."""
    warmup_frac: float = 0.02
    """Fraction of steps of linear warm-up."""
    decay_frac: float = 0.2
    """Fraction of final steps over which the learning rate decays linearly to 0."""
    context: int = 128
    """Tokens per LM context (BOS + text)."""
    lm_batch: int = 8
    """Contexts per LM forward."""
    block_contexts: int = 64
    """Contexts mixed together by the shuffling buffer."""
    include_special: bool = False
    """Train on BOS / EOS / pad positions too (excluded by default)."""
    b_dec_init: Literal["mean", "median", "zero"] = "median"
    """How ``b_dec`` is initialised from the first batch."""
    prefix_balance: float = 0.0
    """Exponent ``p`` of the hierarchical loss's prefix weights ``∝ error_j^(−p)``: 0 weighs
    every budget equally (the paper), 1 gives each budget the same relative weight."""
    aux_alpha: float = 1 / 32
    """AuxK loss weight (0 disables it)."""
    dead_tokens: int = 1_000_000
    """A latent not firing for this many tokens counts as dead."""
    seed: int = 0
    """Seeds the initialisation, the data order and the validation split."""
    val_fraction: float = 0.05
    """Fraction of the documents of a local text file held out for validation (0: none)."""
    val_data: str | None = None
    """A separate validation text (instead of holding out part of ``data``)."""
    val_tokens: int = 16_384
    """Most validation tokens evaluated."""
    val_every: int | None = None
    """Steps between validation evaluations (default: 1/20 of the run)."""
    patience: int = 5
    """Validation evaluations without improvement before training stops early (0: never).
    The best validation checkpoint is what the run writes."""
    checkpoint_dir: str | None = None
    """Folder for checkpoints (none written when unset)."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from ``checkpoint_dir`` when a checkpoint is there."""
    activation_cache: str | None = None
    """Folder for an on-disk activation cache (read when complete, written otherwise)."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """Storage dtype of the activation cache."""
    device: str = "auto"
    """Where the LM and the SAE run: auto, cpu, cuda."""
    lm_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the LM weights."""
    log_every: int = 10
    """Steps between progress-bar metric updates."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    max_steps: int | None = None
    """Stop after this many steps (tests; the schedule still uses ``tokens``)."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "k_max", "tokens", "batch_tokens", "context", "lm_batch",
                     "block_contexts", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.k_max > self.d_sae:
            raise ConfigError(
                f"TrainConfig.k_max ({self.k_max}) must be <= d_sae ({self.d_sae})",
                hint="use a wider SAE (--d-sae) or a smaller --k-max",
            )
        if self.objective not in ("hierarchical", "topk"):
            raise ConfigError(f"TrainConfig.objective must be hierarchical or topk, "
                              f"got {self.objective!r}")
        if self.k is not None and not 1 <= self.k <= self.k_max:
            raise ConfigError(f"TrainConfig.k ({self.k}) must lie in 1..k_max={self.k_max}")
        if self.budgets is not None:
            self.budgets = tuple(sorted({int(b) for b in self.budgets}))
            if not self.budgets or self.budgets[0] < 1 or self.budgets[-1] > self.k_max:
                raise ConfigError(f"TrainConfig.budgets must lie in 1..k_max={self.k_max}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"TrainConfig.val_fraction must lie in [0, 1), "
                              f"got {self.val_fraction}")
        for name in ("val_tokens", "val_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ConfigError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or \
                self.patience < 0:
            raise ConfigError(f"TrainConfig.patience must be an int >= 0, got {self.patience!r}")
        if not 0 <= self.prefix_balance <= 2:
            raise ConfigError(f"TrainConfig.prefix_balance must lie in [0, 2], "
                              f"got {self.prefix_balance}")
        if self.lr != "auto" and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                  or not 0 < self.lr < float("inf")):
            raise ConfigError(f"TrainConfig.lr must be a positive number or 'auto', "
                              f"got {self.lr!r}")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.decay_frac <= 1):
            raise ConfigError("TrainConfig.warmup_frac / decay_frac must lie in [0, 1)")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"TrainConfig.cache_dtype must be float32, float16 or bfloat16, "
                              f"got {self.cache_dtype!r}")
        if self.b_dec_init not in ("mean", "median", "zero"):
            raise ConfigError(f"TrainConfig.b_dec_init must be mean, median or zero, "
                              f"got {self.b_dec_init!r}")

    @property
    def peak_lr(self) -> float:
        """The learning rate the run uses: ``lr``, or :func:`auto_lr` for ``auto``."""
        return auto_lr(self.d_sae) if self.lr == "auto" else float(self.lr)

    @property
    def train_k(self) -> int:
        """The encoder's top-k during training."""
        return self.k_max if self.objective == "hierarchical" or self.k is None else self.k


AUTO_LR_REFERENCE = (2e-3, 4096)
"""``(lr, d_sae)`` the ``auto`` rule is anchored at: chosen on validation documents, see
docs/pareto.md."""


def auto_lr(d_sae: int) -> float:
    """Peak learning rate for width ``d_sae``: ``lr_ref · √(d_ref / d_sae)``.

    The 1/√width scaling is sparsify's rule; the anchor was chosen on validation documents
    (docs/pareto.md). Activations are scaled to E‖x‖² = d_in before training, so the rule does
    not depend on the LM's activation scale.
    """
    lr_ref, d_ref = AUTO_LR_REFERENCE
    return lr_ref * (d_ref / d_sae) ** 0.5
