"""The typer application object shared by every command module (no heavy imports here)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hsae-runtime",
    help="Train, evaluate, export and serve HierarchicalTopK sparse autoencoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
