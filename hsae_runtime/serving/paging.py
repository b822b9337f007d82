"""Paging in a memory-mapped LM's input-embedding matrix at start-up, so the server's RSS does
not keep climbing as new token ids arrive (see :func:`page_in_embeddings`)."""

from __future__ import annotations

import mmap
from typing import Any

import torch


def page_in_embeddings(model: Any) -> None:
    """Read one value per memory page of ``model``'s input-embedding matrix.

    ``from_pretrained`` leaves safetensors weights memory-mapped from the file, and a page of a
    mapping counts in RSS only once it is read. Every layer up to the hookpoint is read by the
    first forward, but an embedding row only when its token id first arrives, so under text
    and token traffic RSS climbed for as long as new ids came in (towards the whole matrix:
    640 MiB for Gemma-3 270M in float32) although nothing leaked. Reading it once at start-up
    puts it in RSS from the start. Layers after the hookpoint never run and stay unread.
    """
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
        return
    if not weight.is_contiguous():
        return
    flat = weight.detach().reshape(-1)  # (d_vocab * d_model,) view
    step = max(mmap.PAGESIZE // flat.element_size(), 1)
    float(flat[::step].sum())
