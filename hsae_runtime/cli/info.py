"""``hsae-runtime info MODEL``: print a model file's config, sizes and whether its tensors match.

Reads only the safetensors header (no tensor data): the config is validated field by field and
the tensors' names, shapes and dtypes are compared with it. A file whose tensors do not match
is reported (a ``tensors`` row naming each mismatch) and refused with exit code 2, as
``serve`` would refuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hsae_runtime.cli.app import app


@app.command()
def info(
    model: Path = typer.Argument(..., help="A .safetensors model file written by hsae-runtime."),
    as_json: bool = typer.Option(False, "--json", help="Print the config as JSON."),
) -> None:
    """Show a model's config, budgets and sizes, and check its tensors (reads only the header)."""
    from hsae_runtime.format import check_tensors, read_config, tensor_layout, tensor_problems

    config = read_config(model)
    if as_json:
        check_tensors(model, config)
        typer.echo(json.dumps(config.to_dict(), indent=2))
        return
    problems = tensor_problems(config, tensor_layout(model))
    budgets = config.trained_budgets
    if budgets == tuple(range(1, config.k_max + 1)):
        budget_text = f"all 1..{config.k_max}"
    else:
        budget_text = ",".join(map(str, budgets))
    n_params = 2 * config.d_in * config.d_sae + config.d_sae + config.d_in
    rows = [
        ("file", str(model)),
        ("size", f"{model.stat().st_size / 2**20:.1f} MiB"),
        ("d_in", str(config.d_in)),
        ("d_sae", str(config.d_sae)),
        ("k_max", str(config.k_max)),
        ("budgets", budget_text),
        ("dtype", config.dtype),
        ("parameters", f"{n_params:,}"),
        ("model_name", str(config.model_name)),
        ("hookpoint", str(config.hookpoint)),
        ("normalization_scale", str(config.normalization_scale)),
        ("apply_b_dec_to_input", str(config.apply_b_dec_to_input)),
    ]
    if config.training:
        rows.append(("training", json.dumps(config.training, sort_keys=True)))
    if problems:
        rows.append(("tensors", "MISMATCH: " + "; ".join(problems)))
    else:
        rows.append(("tensors", f"match the config (4 tensors, {config.dtype})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")
    check_tensors(model, config)  # the same refusal (exit 2) as loading the file
