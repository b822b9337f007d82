"""Shared CLI plumbing: logging set-up, ``--version``, user-error exit behaviour, list flags."""

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


def parse_budgets(text: str | None, flag: str = "--budgets") -> list[int] | None:
    """Budgets from a comma-separated flag value (``"8,16,32"``); ``None`` when it is blank.

    Empty parts and spaces around a number are ignored; anything else that is not an integer is
    a :class:`~hsae_runtime.errors.ConfigError` naming ``flag``. Range checks are the config's.
    """
    from hsae_runtime.errors import ConfigError

    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from err


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
