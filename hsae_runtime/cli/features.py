"""``hsae-runtime features MODEL``: latent dashboards at every budget (cache, stats, report).

torch and transformers are imported inside the command, after logging is configured.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hsae_runtime.cli.app import app
from hsae_runtime.cli.common import parse_budgets


@app.command()
def features(
    model: Path = typer.Argument(..., help="The .safetensors SAE model file."),
    data: str = typer.Option(..., help="Text to read: .txt / .jsonl file (or hf:NAME)."),
    out: Path = typer.Option(..., help="Output folder: cache/, index.html, data/, neuronpedia/."),
    lm: str | None = typer.Option(None, help="LM hub id, folder or .gguf (default: the SAE's)."),
    tokens: int = typer.Option(200_000, help="Tokens to cache (whole contexts, BOS included)."),
    budgets: str | None = typer.Option(
        None, help="Comma-separated budgets (default: the model's, or 1,2,4,...,k_max)."
    ),
    hookpoint: str | None = typer.Option(None, help="Override the SAE's hookpoint."),
    context: int = typer.Option(128, help="Tokens per LM context."),
    lm_batch: int = typer.Option(8, help="Contexts per LM forward."),
    shard_contexts: int = typer.Option(64, help="Contexts per cache shard (x lm_batch)."),
    top: int = typer.Option(10, help="Top activating contexts kept per latent and budget."),
    export: bool = typer.Option(True, "--export/--no-export",
                                help="Write Neuronpedia dashboard batches per budget."),
    model_id: str | None = typer.Option(None, help="Neuronpedia model id (default: the LM's)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    lm_dtype: str = typer.Option("float32", help="LM dtype: float32, float16 or bfloat16."),
    readout: str = typer.Option(
        "encoder", help="Code values: encoder, or refine (as `serve --readout refine` gives)."
    ),
) -> None:
    """Cache the SAE's codes on some text, compute per-latent statistics at every budget and
    write an offline web report (open DIR/index.html over HTTP) and Neuronpedia exports.

    A rerun with the same settings resumes an interrupted cache and reuses a complete one.
    """
    from hsae_runtime.errors import ConfigError
    from hsae_runtime.features.build import build_features
    from hsae_runtime.features.cache import CacheSpec
    from hsae_runtime.lm import load_lm, resolve_device
    from hsae_runtime.sae import SAE

    dev = resolve_device(device)
    sae = SAE.load(model, device=dev).requires_grad_(False).set_readout(readout)
    spec = CacheSpec(tokens=tokens, context=context, lm_batch=lm_batch,
                     shard_contexts=shard_contexts)
    lm_name = lm or sae.config.model_name
    if lm_name is None:
        raise ConfigError("the SAE file names no LM", hint="pass --lm")
    loaded = load_lm(lm_name, device=dev, dtype=lm_dtype)
    build_features(model, sae, loaded, data, out, spec, budgets=parse_budgets(budgets),
                   top_n=top, hookpoint=hookpoint, export=export, model_id=model_id)
    typer.echo(f"report: {out / 'index.html'}  (serve it: python -m http.server -d {out})")
