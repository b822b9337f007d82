"""``hsae-runtime train`` and ``hsae-runtime eval``.

Both are thin: they fill :class:`~hsae_runtime.training.trainer.TrainConfig` or call
:func:`~hsae_runtime.training.evaluate.evaluate_many`. torch and transformers are imported
inside the command bodies. Under ``torchrun --nproc-per-node N -m hsae_runtime.cli train ...``
the trainer joins the process group itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from hsae_runtime.cli.app import app
from hsae_runtime.cli.common import parse_budgets

logger = logging.getLogger(__name__)


def _include_special(include_special: bool, keep_special: bool) -> bool:
    """``--include-special``, also set by its deprecated spelling ``--keep-special``."""
    if keep_special:
        logger.warning("--keep-special is deprecated; use --include-special")
    return include_special or keep_special


def _default(name: str) -> str:
    """``TrainConfig``'s default for a field, for help texts (TrainConfig owns every default)."""
    from dataclasses import fields

    from hsae_runtime.training.config import TrainConfig

    value = next(f.default for f in fields(TrainConfig) if f.name == name)
    return f" [default: {value}]"


@app.command()
def train(
    lm: str = typer.Option("google/gemma-2-2b", help="LM: hub id, local folder or .gguf file."),
    hookpoint: str = typer.Option(..., help="e.g. model.layers.6 or blocks.6.hook_resid_post."),
    data: str = typer.Option(..., help="Text: .txt / .jsonl file or hf:NAME[:CONFIG][:SPLIT]."),
    d_sae: int = typer.Option(..., help="Number of latents."),
    k_max: int = typer.Option(..., help="Largest budget (encoder top-k)."),
    out: Path = typer.Option(..., help="Output model file (.safetensors)."),
    objective: str = typer.Option("hierarchical", help="hierarchical or topk."),
    k: int | None = typer.Option(None, help="Budget of the topk objective (default k-max)."),
    budgets: str | None = typer.Option(None, help="Hierarchical budgets, e.g. 1,2,4,8 "
                                       "(default all 1..k-max)."),
    tokens: int | None = typer.Option(None, help="Training tokens." + _default("tokens")),
    batch_tokens: int | None = typer.Option(None, help="Tokens per step (global)."
                                            + _default("batch_tokens")),
    lr: str | None = typer.Option(None, help="Peak learning rate, or 'auto' (a rule scaled by "
                                  "width, see docs/pareto.md)." + _default("lr")),
    prefix_balance: float | None = typer.Option(
        None, help="Hierarchical loss: prefix weights ∝ error^-p (0 = the paper's equal "
        "weights)." + _default("prefix_balance")),
    val_fraction: float | None = typer.Option(
        None, help="Documents of a local --data file held out for validation (early stopping, "
        "best checkpoint); 0 disables." + _default("val_fraction")),
    val_data: str | None = typer.Option(None, help="A separate validation text instead."),
    patience: int | None = typer.Option(None, help="Validation checks without improvement "
                                        "before stopping (0: never)." + _default("patience")),
    context: int | None = typer.Option(None, help="Tokens per LM context." + _default("context")),
    lm_batch: int | None = typer.Option(None, help="Contexts per LM forward."
                                        + _default("lm_batch")),
    block_contexts: int | None = typer.Option(None, help="Contexts mixed by the shuffling "
                                              "buffer." + _default("block_contexts")),
    seed: int | None = typer.Option(None, help="Seed for init, data order and the validation "
                                    "split." + _default("seed")),
    checkpoint_dir: Path | None = typer.Option(None, help="Checkpoint folder."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints."
                                                + _default("checkpoint_every")),
    resume: bool = typer.Option(False, help="Resume from --checkpoint-dir."),
    activation_cache: Path | None = typer.Option(None, help="On-disk activation cache folder."),
    cache_dtype: str | None = typer.Option(None, help="Cache storage dtype (float32, bfloat16, "
                                           "float16)." + _default("cache_dtype")),
    include_special: bool = typer.Option(False, help="Train on BOS/EOS/pad tokens too."),
    keep_special: bool = typer.Option(
        False, "--keep-special/--no-keep-special", hidden=True,
        help="Deprecated spelling of --include-special.",
    ),
    aux_alpha: float | None = typer.Option(None, help="AuxK loss weight (0 disables)."
                                           + _default("aux_alpha")),
    dead_tokens: int | None = typer.Option(None, help="Tokens without firing = dead."
                                           + _default("dead_tokens")),
    device: str | None = typer.Option(None, help="auto, cpu or cuda." + _default("device")),
    lm_dtype: str | None = typer.Option(None, help="LM weights dtype." + _default("lm_dtype")),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a HierarchicalTopK (or TopK) SAE on a live LM's activations."""
    from hsae_runtime.errors import ConfigError
    from hsae_runtime.training.trainer import TrainConfig
    from hsae_runtime.training.trainer import train as run_train

    learning_rate: float | str | None = lr
    if lr is not None and lr != "auto":
        try:
            learning_rate = float(lr)
        except ValueError as err:
            raise ConfigError(f"--lr must be a number or 'auto', got {lr!r}") from err
    optional = dict(
        tokens=tokens, batch_tokens=batch_tokens, lr=learning_rate, context=context,
        lm_batch=lm_batch, block_contexts=block_contexts, seed=seed,
        checkpoint_every=checkpoint_every, cache_dtype=cache_dtype, aux_alpha=aux_alpha,
        dead_tokens=dead_tokens, device=device, lm_dtype=lm_dtype,
        prefix_balance=prefix_balance, val_fraction=val_fraction, val_data=val_data,
        patience=patience,
    )
    cfg = TrainConfig(
        lm=lm, hookpoint=hookpoint, data=data, d_sae=d_sae, k_max=k_max, out=str(out),
        objective=objective,  # type: ignore[arg-type]  # validated in __post_init__
        k=k, budgets=tuple(b) if (b := parse_budgets(budgets)) else None,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, resume=resume,
        activation_cache=str(activation_cache) if activation_cache else None,
        include_special=_include_special(include_special, keep_special), progress=progress,
        **{key: value for key, value in optional.items() if value is not None},  # type: ignore[arg-type]
    )
    try:
        result = run_train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    total = result.lm_seconds + result.sae_seconds
    logger.info(
        "done: %d steps, %d tokens, %.0f tok/s; time LM %.1fs / SAE %.1fs (%.0f%% LM)",
        result.steps, result.tokens, result.tokens / max(result.wall_seconds, 1e-9),
        result.lm_seconds, result.sae_seconds, 100 * result.lm_seconds / max(total, 1e-9),
    )


def _model_names(paths: list[Path]) -> list[str]:
    """A short distinct name per SAE file: its stem, numbered when two stems clash."""
    names: list[str] = []
    for path in paths:
        name, n = path.stem, 1
        while name in names:
            n += 1
            name = f"{path.stem}-{n}"
        names.append(name)
    return names


@app.command("eval")
def eval_cmd(
    models: list[Path] = typer.Argument(..., help="SAE model file(s) (.safetensors); the first "
                                        "is the reference the others are compared with."),
    lm: str | None = typer.Option(None, help="LM (default: the one in the first SAE file)."),
    data: str = typer.Option(..., help="Eval text: .txt / .jsonl file."),
    json_out: Path = typer.Option(..., "--json", help="Write the metrics here."),
    budgets: str | None = typer.Option(None, help="e.g. 1,2,4,8 (default powers of 2 up to "
                                       "the largest k_max)."),
    tokens: int = typer.Option(50_000, help="Eval tokens (FVU)."),
    ce_tokens: int | None = typer.Option(None, help="Tokens for CE and KL (default all)."),
    hookpoint: str | None = typer.Option(None, help="Override the SAEs' hookpoint."),
    context: int = typer.Option(128, help="Tokens per LM context."),
    lm_batch: int = typer.Option(8, help="Contexts per LM forward."),
    plot: Path | None = typer.Option(None, help="Write FVU-vs-k plot (png)."),
    compare: list[Path] = typer.Option([], help="Another SAE file to compare with the first "
                                       "(repeatable; same as listing it after it)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    readout: str = typer.Option(
        "encoder", help="Code values: encoder, or refine (refitted per token to each SAE's own "
        "objective; see docs/pareto.md).",
    ),
    include_special: bool = typer.Option(False, help="Include BOS/EOS/pad tokens."),
    keep_special: bool = typer.Option(
        False, "--keep-special/--no-keep-special", hidden=True,
        help="Deprecated spelling of --include-special.",
    ),
) -> None:
    """Evaluate SAEs at every budget: FVU (corpus and per token), MSE, L0, dead fraction,
    CE delta / recovered and KL with the reconstruction spliced into the LM.

    Every SAE (``eval A B C`` or ``eval A --compare B --compare C``) is evaluated on the same
    tokens; the JSON is ``{"reference", "lm", "hookpoint", "data", "models": {name: {"path",
    "tokens", "ce_clean", ..., "dead_fraction", "budgets": {"k": {metric: value}}}}}`` with
    names from the file stems. Printed: one model's table, or per metric a side-by-side table
    and the ratios (and nats differences for ce_delta, kl) of the first model over each other.
    """
    from hsae_runtime.errors import ConfigError
    from hsae_runtime.lm import load_lm, resolve_device
    from hsae_runtime.sae import SAE
    from hsae_runtime.training.compare import compare_tables, model_table
    from hsae_runtime.training.evaluate import evaluate_many, plot_fvu

    paths = [*models, *compare]
    names = _model_names(paths)
    dev = resolve_device(device)
    saes = {name: SAE.load(path, device=dev).set_readout(readout)
            for name, path in zip(names, paths)}  # fail early
    lm_name = lm or saes[names[0]].config.model_name
    if lm_name is None:
        raise ConfigError("the SAE file names no LM", hint="pass --lm")
    loaded = load_lm(lm_name, device=dev)
    results = evaluate_many(saes, loaded, data, hookpoint=hookpoint,
                            budgets=parse_budgets(budgets), tokens=tokens, ce_tokens=ce_tokens,
                            context=context, lm_batch=lm_batch,
                            include_special=_include_special(include_special, keep_special),
                            progress=True)
    main = results[names[0]]
    report = {
        "reference": names[0], "lm": lm_name, "hookpoint": main["hookpoint"], "data": data,
        "readout": readout,
        "models": {name: {"path": str(path), **results[name]} for name, path in zip(names, paths)},
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    typer.echo(compare_tables(results) if len(results) > 1 else model_table(main))
    typer.echo(f"tokens={main['tokens']}  ce_tokens={main['ce_tokens']}  "
               f"ce_clean={main['ce_clean']:.4f}  -> {json_out}")
    if plot is not None:
        plot_fvu(results, plot)
