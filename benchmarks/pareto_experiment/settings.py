"""The Pareto experiment's settings and its command line.

``Settings`` is everything a run depends on (it is recorded in ``results.json``);
``parse_args`` maps the flags of ``benchmarks/pareto.py`` onto it (``--quick`` swaps in a tiny
configuration before explicit flags apply). ``sae_specs`` names the SAEs every stage iterates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __doc__ as _PACKAGE_DOC  # --help opens with its first paragraph

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"


@dataclass
class Settings:
    """Everything the experiment depends on; recorded in results.json."""

    out: str
    lm: str | None = None  # None: Gemma-3 270M Q4_K_M from PyPI
    hookpoint: str = "model.layers.9"
    data: str = str(DEFAULT_DATA)
    val_fraction: float = 0.1
    eval_fraction: float = 0.2
    split_seed: int = 0
    max_docs: int | None = None
    context: int = 1024
    lm_batch: int = 4
    d_sae: int = 4096
    k_max: int = 64
    topk_ks: tuple[int, ...] = (8, 16, 32, 64)
    eval_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    tokens: int = 2_097_152
    batch_tokens: int = 1024
    # The recipe: None takes hsae-runtime train's default (TrainConfig), so the experiment
    # measures what a user gets with the defaults unless a flag overrides one.
    lr: float | None = None
    warmup_frac: float | None = None
    decay_frac: float | None = None
    aux_alpha: float | None = None
    prefix_balance: float | None = None
    b_dec_init: str | None = None
    readout: str = "encoder"  # how code values are set at evaluation (hsae_runtime.refine)
    only: tuple[str, ...] | None = None  # train / evaluate only these SAEs (e.g. htopk64,topk8)
    seed: int = 0
    ce_tokens: int = 8192
    ce_ks: tuple[int, ...] | None = None  # None: the eval budgets
    ce_mode: str = "all"  # all: every SAE at ce_ks; claims: only the configurations the claims use
    ce_group: int = 12
    ce_chunk: int = 256
    timing_rounds: int = 4
    timing_steps: int = 5
    threads: int | None = None
    cache_dir: str | None = None  # where data/ and cache/ live (default: out); runs can share
    train: bool = True  # False: evaluate the models already under out/ (partial reports)
    quick: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    "layer9-4096": {"hookpoint": "model.layers.9", "d_sae": 4096},
    "layer5-8192": {"hookpoint": "model.layers.5", "d_sae": 8192},
}
"""The two settings ``make pareto`` runs (``--setting NAME``), so a recipe is not tuned to one."""


def cache_root(s: Settings) -> Path:
    """Folder of the document split and activation caches (the cache is keyed on its paths)."""
    return Path(s.cache_dir or s.out)


def sae_specs(s: Settings) -> list[tuple[str, str, int]]:
    """``(name, objective, k)`` of every SAE: the hierarchical one first."""
    specs = [(f"htopk{s.k_max}", "hierarchical", s.k_max)] + [
        (f"topk{k}", "topk", k) for k in s.topk_ks
    ]
    return [sp for sp in specs if s.only is None or sp[0] in s.only]


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=(_PACKAGE_DOC or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for caches, models and results")
    p.add_argument("--quick", action="store_true",
                   help="tiny random Gemma-2, small SAEs, few tokens: an end-to-end smoke run")
    p.add_argument("--setting", choices=sorted(PRESETS),
                   help="a named setting (hookpoint and width); explicit flags override it")
    p.add_argument("--lm", help="hub id, folder or .gguf (default: Gemma-3 270M from PyPI)")
    p.add_argument("--hookpoint")
    p.add_argument("--data", help=f"text file (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", help="share the split and activation caches of another --out")
    ints = ["split-seed", "max-docs", "context", "lm-batch", "d-sae", "k-max", "tokens",
            "batch-tokens", "seed", "ce-tokens", "ce-group", "ce-chunk", "timing-rounds",
            "timing-steps", "threads"]
    for name in ints:
        p.add_argument(f"--{name}", type=int)
    for name in ("val-fraction", "eval-fraction", "lr", "warmup-frac", "decay-frac", "aux-alpha",
                 "prefix-balance"):
        p.add_argument(f"--{name}", type=float)
    for name in ("topk-ks", "eval-ks", "ce-ks"):
        p.add_argument(f"--{name}", help="comma-separated budgets")
    p.add_argument("--only", help="comma-separated SAE names to train and evaluate "
                   "(htopk64,topk8,...)")
    p.add_argument("--no-train", dest="train", action="store_false", default=None,
                   help="skip training and step timing; evaluate the models already in --out")
    p.add_argument("--readout", choices=["encoder", "refine"],
                   help="evaluate every SAE with this readout (default encoder; refine: values "
                   "refitted per token to each SAE's own objective)")
    p.add_argument("--ce-mode", choices=["all", "claims"],
                   help="splice every SAE at every budget (all) or only the claims' pairs")
    a = p.parse_args(argv)
    base: dict[str, Any] = {}
    if a.quick:
        base = dict(d_sae=256, k_max=16, topk_ks=(4, 8, 16), eval_ks=(1, 2, 4, 8, 16),
                    context=128, lm_batch=8, max_docs=20, tokens=16_384, batch_tokens=256,
                    lr=2e-3, ce_tokens=512, ce_chunk=128, timing_rounds=2, timing_steps=2,
                    hookpoint="model.layers.1", quick=True)
    if a.setting:
        base.update(PRESETS[a.setting])
    for key, value in vars(a).items():
        if value is None or key in ("quick", "setting"):
            continue
        if key in ("topk_ks", "eval_ks", "ce_ks"):
            value = tuple(int(v) for v in value.split(","))
        if key == "only":
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        base[key] = value
    return Settings(**base)
