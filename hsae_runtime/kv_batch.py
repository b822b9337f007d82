"""Join and trim the KV caches of left-padded batches, so sequences can enter and leave a batch.

A :class:`~hsae_runtime.lm.PrefixCache` of ``B`` sequences holds, per attention layer, keys and
values ``[B, heads, S, head_dim]`` and the attention mask ``[B, C]`` of the ``C`` positions run
so far (0 = left padding). Every row's real tokens sit right-aligned at indices ``C - c_b .. C``,
and each row's positions count from its own first token, so a row's attention is the same at
any amount of left padding. Two operations rely on that:

* :func:`join_into` appends the rows of one cache to another: the shorter side gets
  ``|C_a - C_b|`` columns of left padding (zero keys and values, mask 0), so the joined cache
  has ``max(C_a, C_b)`` columns and each row attends to exactly its own tokens;
* :func:`trim_padding` drops leading columns that are padding in every row (after the longest
  rows left), so a batch that sequences keep joining does not grow without bound.

transformers' cache layers: a full-attention ``DynamicLayer`` stores all ``C`` columns; a
``DynamicSlidingWindowLayer`` (window ``w``, Gemma-2/3 local layers) stores the last
``min(C, w - 1)`` and counts ``C`` in ``cumulative_length``, from which the attention mask's
window offset is computed; both are padded and trimmed to those lengths. Any other layer kind
(static, quantised, offloaded, past-recording sliding layers) raises :class:`UnsupportedCache`
before anything is changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsae_runtime.lm import PrefixCache


class UnsupportedCache(Exception):
    """The cache has a layer kind whose columns this module cannot pad or trim."""


def _layers(cache: PrefixCache) -> list[Any]:
    """The cache's layers, checked to be ones this module can edit."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if cache.kv is None or cache.mask is None:
        raise UnsupportedCache("the cache is empty: run the prompts (one step) first")
    layers = list(getattr(cache.kv, "layers", None) or [])
    if not layers:
        raise UnsupportedCache(f"{type(cache.kv).__name__} has no per-layer storage")
    for layer in layers:
        kind = type(layer)
        if kind not in (DynamicLayer, DynamicSlidingWindowLayer) or not layer.is_initialized:
            raise UnsupportedCache(f"cache layer {kind.__name__} cannot be padded or trimmed")
        if kind is DynamicSlidingWindowLayer:
            if layer.record_past or layer.cumulative_length != cache.length:
                raise UnsupportedCache("a sliding-window layer out of step with the mask")
        elif layer.keys.shape[-2] != cache.length:
            raise UnsupportedCache("a full-attention layer out of step with the mask")
    return layers


def _stored(layer: Any, columns: int) -> int:
    """How many key columns the layer keeps when ``columns`` positions have run."""
    if getattr(layer, "is_sliding", False):
        return min(columns, int(layer.sliding_window) - 1)
    return columns


def _pad_left(t: Tensor, n: int) -> Tensor:
    """``t [B, heads, S, head_dim]`` with ``n`` zero columns in front."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def join_into(cache: PrefixCache, other: PrefixCache) -> None:
    """Append ``other``'s rows to ``cache`` (in place), left-padding the shorter to the longer.

    Afterwards ``cache.mask`` is ``[B_a + B_b, max(C_a, C_b)]``; ``other`` must not be used
    again. Raises :class:`UnsupportedCache` (and changes nothing) for layers it cannot edit.
    """
    mine, theirs = _layers(cache), _layers(other)
    layout = [(type(a), getattr(a, "sliding_window", None)) for a in mine]
    if layout != [(type(b), getattr(b, "sliding_window", None)) for b in theirs]:
        raise UnsupportedCache("the two caches come from different layer layouts")
    assert cache.mask is not None and other.mask is not None
    c_a, c_b = cache.length, other.length
    c = max(c_a, c_b)
    for a, b in zip(mine, theirs, strict=True):
        target = _stored(a, c)
        pad_a, pad_b = target - a.keys.shape[-2], target - b.keys.shape[-2]
        a.keys = torch.cat([_pad_left(a.keys, pad_a), _pad_left(b.keys, pad_b)], dim=0)
        a.values = torch.cat([_pad_left(a.values, pad_a), _pad_left(b.values, pad_b)], dim=0)
        if a.is_sliding:
            a.cumulative_length = c
    mask_a = torch.nn.functional.pad(cache.mask, (c - c_a, 0))  # (B_a, C)
    mask_b = torch.nn.functional.pad(other.mask.to(cache.mask), (c - c_b, 0))  # (B_b, C)
    cache.mask = torch.cat([mask_a, mask_b], dim=0)


def trim_padding(cache: PrefixCache) -> int:
    """Drop the leading columns that are padding in every row (in place); returns how many.

    Leaves the cache alone (returns 0) when it is empty or holds a layer it cannot edit.
    """
    if cache.mask is None or cache.mask.shape[0] == 0:
        return 0
    used = cache.mask.bool().any(dim=0).nonzero()  # (n_used, 1)
    drop = int(used[0, 0]) if used.numel() else 0
    if drop == 0:
        return 0
    try:
        layers = _layers(cache)
    except UnsupportedCache:
        return 0
    c = cache.length - drop
    for layer in layers:
        keep = _stored(layer, c)
        start = layer.keys.shape[-2] - keep
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
        if layer.is_sliding:
            layer.cumulative_length = c
    cache.mask = cache.mask[:, drop:]
    return drop
