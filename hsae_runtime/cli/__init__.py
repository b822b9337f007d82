"""The ``hsae-runtime`` command line.

One module per verb group registers its commands on the shared :data:`app`; each command imports
torch, transformers, grpc ... inside its body, after logging is configured, so ``--help`` and
``--version`` stay fast. :func:`main` is the console-script entry: it turns every
:class:`~hsae_runtime.errors.HSAEError` into a one-line message and exit code 2 (no traceback).

Run as ``hsae-runtime ...`` or ``python -m hsae_runtime.cli ...`` (the latter under torchrun).
"""

from __future__ import annotations

import logging
import sys

import typer

# Command modules register their commands on the shared app when imported; a module that fails
# to import fails the CLI loudly rather than silently dropping its commands.
from hsae_runtime.cli import common, export, features, info, serve, train, triton
from hsae_runtime.cli.app import app

__all__ = ["app", "main", "common", "export", "features", "info", "serve", "train", "triton"]


def main() -> None:
    """Console-script entry point."""
    from hsae_runtime.errors import HSAEError

    try:
        app()
    except HSAEError as err:
        logging.getLogger("hsae_runtime").debug("user error", exc_info=True)
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
