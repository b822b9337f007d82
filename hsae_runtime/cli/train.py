"""``hsae-runtime train`` and ``hsae-runtime eval``.

Both are thin: they fill :class:`~hsae_runtime.training.trainer.TrainConfig` or call
:func:`~hsae_runtime.training.evaluate.evaluate`. torch and transformers are imported inside the
command bodies. Under ``torchrun --nproc-per-node N -m hsae_runtime.cli train ...`` the trainer
joins the process group itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from hsae_runtime.cli.app import app

logger = logging.getLogger(__name__)


def _parse_budgets(text: str | None) -> list[int] | None:
    from hsae_runtime.errors import ConfigError

    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"--budgets must be comma-separated ints, got {text!r}") from err


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
    tokens: int = typer.Option(1_000_000, help="Training tokens."),
    batch_tokens: int = typer.Option(1024, help="Tokens per step (global)."),
    lr: float = typer.Option(5e-4, help="Peak learning rate."),
    context: int = typer.Option(128, help="Tokens per LM context."),
    lm_batch: int = typer.Option(8, help="Contexts per LM forward."),
    block_contexts: int = typer.Option(64, help="Contexts mixed by the shuffling buffer."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    checkpoint_dir: Path | None = typer.Option(None, help="Checkpoint folder."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints."),
    resume: bool = typer.Option(False, help="Resume from --checkpoint-dir."),
    activation_cache: Path | None = typer.Option(None, help="On-disk activation cache folder."),
    cache_dtype: str = typer.Option("bfloat16", help="Cache storage dtype (float32, bfloat16, "
                                    "float16)."),
    keep_special: bool = typer.Option(False, help="Train on BOS/EOS/pad tokens too."),
    aux_alpha: float = typer.Option(1 / 32, help="AuxK loss weight (0 disables)."),
    dead_tokens: int = typer.Option(1_000_000, help="Tokens without firing = dead."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    lm_dtype: str = typer.Option("float32", help="LM weights dtype."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a HierarchicalTopK (or TopK) SAE on a live LM's activations."""
    from hsae_runtime.training.trainer import TrainConfig
    from hsae_runtime.training.trainer import train as run_train

    cfg = TrainConfig(
        lm=lm, hookpoint=hookpoint, data=data, d_sae=d_sae, k_max=k_max, out=str(out),
        objective=objective,  # type: ignore[arg-type]  # validated in __post_init__
        k=k, budgets=tuple(b) if (b := _parse_budgets(budgets)) else None, tokens=tokens,
        batch_tokens=batch_tokens, lr=lr, context=context, lm_batch=lm_batch,
        block_contexts=block_contexts, seed=seed,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every, resume=resume,
        activation_cache=str(activation_cache) if activation_cache else None,
        cache_dtype=cache_dtype,  # type: ignore[arg-type]
        include_special=keep_special, aux_alpha=aux_alpha, dead_tokens=dead_tokens,
        device=device, lm_dtype=lm_dtype,  # type: ignore[arg-type]
        progress=progress,
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


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="SAE model file (.safetensors)."),
    lm: str | None = typer.Option(None, help="LM (default: the one in the SAE file)."),
    data: str = typer.Option(..., help="Eval text: .txt / .jsonl file."),
    json_out: Path = typer.Option(..., "--json", help="Write the metrics here."),
    budgets: str | None = typer.Option(None, help="e.g. 1,2,4,8 (default powers of 2)."),
    tokens: int = typer.Option(50_000, help="Eval tokens (FVU)."),
    ce_tokens: int | None = typer.Option(None, help="Tokens for CE (default all)."),
    hookpoint: str | None = typer.Option(None, help="Override the SAE's hookpoint."),
    context: int = typer.Option(128, help="Tokens per LM context."),
    lm_batch: int = typer.Option(8, help="Contexts per LM forward."),
    plot: Path | None = typer.Option(None, help="Write FVU-vs-k plot (png)."),
    compare: list[Path] = typer.Option([], help="Other SAE files to evaluate and overlay."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    keep_special: bool = typer.Option(False, help="Include BOS/EOS/pad tokens."),
) -> None:
    """Evaluate an SAE at every budget (FVU, MSE, L0, CE delta / recovered, dead %)."""
    from hsae_runtime.errors import ConfigError
    from hsae_runtime.lm import load_lm, resolve_device
    from hsae_runtime.sae import SAE
    from hsae_runtime.training.evaluate import evaluate, plot_fvu

    dev = resolve_device(device)
    sae = SAE.load(model, device=dev)
    lm_name = lm or sae.config.model_name
    if lm_name is None:
        raise ConfigError("the SAE file names no LM", hint="pass --lm")
    loaded = load_lm(lm_name, device=dev)
    wanted = _parse_budgets(budgets)

    def run(path: Path, s: SAE) -> dict:
        bs = [b for b in wanted if b <= s.config.k_max] if wanted and path != model else wanted
        res = evaluate(s, loaded, data, hookpoint=hookpoint, budgets=bs, tokens=tokens,
                       ce_tokens=ce_tokens, context=context, lm_batch=lm_batch,
                       include_special=keep_special, progress=True)
        return {"model": str(path), "lm": lm_name, "hookpoint": hookpoint or s.config.hookpoint,
                **res}

    result = run(model, sae)
    others = [run(p, SAE.load(p, device=dev)) for p in compare]
    if others:
        result["compare"] = others
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    for k, m in result["budgets"].items():
        typer.echo(f"k={k:>4}  fvu={m['fvu']:.4f}  l0={m['l0']:.1f}  "
                   f"ce_delta={m['ce_delta']:.4f}  ce_recovered={m['ce_recovered']:.3f}")
    typer.echo(f"dead={100 * result['dead_fraction']:.1f}%  tokens={result['tokens']}  "
               f"-> {json_out}")
    if plot is not None:
        plot_fvu({r["model"]: r for r in [result, *others]}, plot)
