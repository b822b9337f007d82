"""``python -m hsae_runtime.cli`` (used under ``torchrun``)."""

from hsae_runtime.cli import main

main()
