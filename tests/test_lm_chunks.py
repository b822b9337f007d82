"""Chunked capture (``capture(..., cache=PrefixCache())``) on the tiny Gemma-2: chunk by chunk on
the KV cache equals one forward over the whole sequences, right padding and the sliding window
included (the fixture's window is 64 tokens; its layers alternate sliding / full attention)."""

from __future__ import annotations

import pytest
import torch

from hsae_runtime.errors import InputError
from hsae_runtime.lm import PrefixCache, capture

LENGTHS = [300, 170, 41]
"""A right-padded batch as the batcher builds it: each longer than the sliding window or not."""


@pytest.fixture(scope="module")
def padded(lm):
    """``ids, mask [3, 300]``: random tokens, right-padded with the pad id."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(lm.tokenizer), (len(LENGTHS), max(LENGTHS)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = lm.tokenizer.pad_token_id
    return ids, mask


def _chunked(lm, hookpoint, ids, mask, size):
    cache = PrefixCache()
    parts = [
        capture(lm, hookpoint, ids[:, s : s + size], mask[:, s : s + size], cache=cache)
        for s in range(0, ids.shape[1], size)
    ]
    assert cache.length == ids.shape[1]
    return torch.cat(parts, dim=1)  # (B, T, d_model)


@pytest.mark.parametrize(
    "hookpoint",
    ["model.layers.1", "model.layers.2", "blocks.2.hook_resid_pre", "blocks.0.hook_resid_pre"],
)
@pytest.mark.parametrize("size", [37, 64, 128])
def test_chunked_capture_equals_one_forward(lm, padded, hookpoint, size):
    ids, mask = padded
    whole = capture(lm, hookpoint, ids, mask)  # (B, T, d_model)
    chunked = _chunked(lm, hookpoint, ids, mask, size)
    assert chunked.shape == whole.shape and chunked.dtype == torch.float32
    for i, n in enumerate(LENGTHS):  # real tokens; padded positions are never encoded
        torch.testing.assert_close(chunked[i, :n], whole[i, :n], rtol=1e-5, atol=1e-5)


def test_chunks_without_the_cache_differ(lm, padded):
    """The oracle is sharp: chunks run without the previous chunks' cache do not match."""
    ids, mask = padded
    whole = capture(lm, "model.layers.1", ids[:1], mask[:1])
    alone = torch.cat(
        [capture(lm, "model.layers.1", ids[:1, s : s + 64]) for s in range(0, 300, 64)], dim=1
    )
    assert (alone - whole).abs().max() > 1e-2


def test_chunked_capture_runs_only_up_to_the_hookpoint(lm, padded):
    ids, mask = padded
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, layer in enumerate(lm.model.model.layers)
    ]
    try:
        cache = PrefixCache()
        for s in range(0, 128, 64):
            capture(lm, "model.layers.1", ids[:, s : s + 64], mask[:, s : s + 64], cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1, 0, 1]
    assert cache.mask is not None and tuple(cache.mask.shape) == (3, 128)


def test_a_cache_keeps_its_batch_size(lm, padded):
    ids, mask = padded
    cache = PrefixCache()
    capture(lm, "model.layers.0", ids[:, :10], mask[:, :10], cache=cache)
    with pytest.raises(InputError, match="batch size"):
        capture(lm, "model.layers.0", ids[:1, 10:20], mask[:1, 10:20], cache=cache)
