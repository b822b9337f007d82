"""Shared CLI plumbing: logging set-up, ``--version``, and user-error exit behaviour."""

from __future__ import annotations

import logging

import typer

from hsae_runtime.cli.app import app

_configured = False


def setup_logging(verbose: bool = False) -> None:
    """Configure the root handler once (library modules only create loggers)."""
    global _configured
    level = logging.DEBUG if verbose else logging.INFO
    if _configured:
        logging.getLogger().setLevel(level)
        return
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    _configured = True


def _version_callback(value: bool) -> None:
    if value:
        from hsae_runtime import __version__

        typer.echo(f"hsae-runtime {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Train, evaluate, export and serve HierarchicalTopK sparse autoencoders."""
    setup_logging(verbose)
