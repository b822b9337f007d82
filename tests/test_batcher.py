"""The dynamic batcher on its own (no gRPC): batch limits, draining on close, early close.

The server-level behaviour (coalescing concurrent RPCs, queue limits, deadlines, cancellation)
is tested through real RPCs in ``test_serving.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hsae_runtime.sae import SAE
from hsae_runtime.serving.backend import TorchBackend
from hsae_runtime.serving.batcher import Batcher, BatcherConfig, Job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sae(tiny_sae_path: Path) -> SAE:
    return SAE.load(tiny_sae_path).requires_grad_(False)


def test_batcher_respects_max_batch_tokens_and_drains_on_close(sae):
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_batch_tokens=10, max_wait_ms=300))
    xs = [torch.randn(4, 64) for _ in range(5)]
    futures = [batcher.submit(Job(budgets=[2, 4], activations=x)) for x in xs]
    batcher.close()  # finishes what is queued
    for x, future in zip(xs, futures):
        np.testing.assert_array_equal(future.result(0).indices, sae.encode(x, 4).indices)
    assert batcher.stats.batches == 3  # 4+4 | 4+4 | 4: a fifth row set would exceed 10
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(Job(budgets=[4], activations=xs[0]))


def test_batch_closes_early_once_as_large_as_the_last_one(sae):
    """A lone client never sits out max_wait; a batch stops waiting at the last batch's size."""
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_wait_ms=3000))
    try:
        for _ in range(3):  # sequential requests: each its own batch, none waits 3 s
            start = time.monotonic()
            batcher.run(Job(budgets=[4], activations=torch.randn(2, 64)), timeout=30)
            assert time.monotonic() - start < 1.5
        # A request being parsed holds the batch open (up to max_wait) so it can join.
        with batcher.arriving():
            first = batcher.submit(Job(budgets=[4], activations=torch.randn(1, 64)))
            time.sleep(0.3)
            assert not first.done()  # target 1 reached, but a request is still arriving
            second = batcher.submit(Job(budgets=[4], activations=torch.randn(1, 64)))
        first.result(30), second.result(30)
        assert batcher.stats.batches == 4  # the last two shared one batch
    finally:
        batcher.close()
