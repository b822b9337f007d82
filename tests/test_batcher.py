"""The dynamic batcher on its own (no gRPC): batch limits, draining on close, early close;
decode jobs run on the worker thread, batched beside encodes and chunked when long.

The server-level behaviour (coalescing concurrent RPCs, queue limits, deadlines, cancellation)
is tested through real RPCs in ``test_serving.py``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from serving_helpers import DelayedBackend

from hsae_runtime.sae import SparseCode
from hsae_runtime.serving.backend import TorchBackend
from hsae_runtime.serving.batcher import Batcher
from hsae_runtime.serving.jobs import DecodeJob, EncodeJob
from hsae_runtime.serving.limits import BatcherConfig

pytestmark = pytest.mark.timeout(120)


def test_batcher_respects_max_batch_tokens_and_drains_on_close(sae):
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_batch_tokens=10, max_wait_ms=300))
    xs = [torch.randn(4, 64) for _ in range(5)]
    futures = [batcher.submit(EncodeJob(budgets=[2, 4], activations=x)) for x in xs]
    batcher.close()  # finishes what is queued
    for x, future in zip(xs, futures):
        np.testing.assert_array_equal(future.result(0).indices, sae.encode(x, 4).indices)
    assert batcher.stats.batches == 3  # 4+4 | 4+4 | 4: a fifth row set would exceed 10
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(EncodeJob(budgets=[4], activations=xs[0]))


def test_batch_closes_early_once_as_large_as_the_last_one(sae):
    """A lone client never sits out max_wait; a batch stops waiting at the last batch's size."""
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_wait_ms=3000))
    try:
        for _ in range(3):  # sequential requests: each its own batch, none waits 3 s
            start = time.monotonic()
            batcher.run(EncodeJob(budgets=[4], activations=torch.randn(2, 64)), timeout=30)
            assert time.monotonic() - start < 1.5
        # A request being parsed holds the batch open (up to max_wait) so it can join.
        with batcher.arriving():
            first = batcher.submit(EncodeJob(budgets=[4], activations=torch.randn(1, 64)))
            time.sleep(0.3)
            assert not first.done()  # target 1 reached, but a request is still arriving
            second = batcher.submit(EncodeJob(budgets=[4], activations=torch.randn(1, 64)))
        first.result(30), second.result(30)
        assert batcher.stats.batches == 4  # the last two shared one batch
    finally:
        batcher.close()


def test_one_batch_mixes_numpy_and_tensor_rows_of_any_dtype(sae):
    """Request threads hand numpy arrays (float32/float16) or tensors (bfloat16) to the batcher;
    one batch of all of them equals encoding each on its own, at each job's own budget."""
    rng = np.random.default_rng(0)
    inputs = [
        rng.standard_normal((3, 64)).astype(np.float32),
        rng.standard_normal((1, 64)).astype(np.float16),
        torch.randn(2, 64, dtype=torch.bfloat16),
        torch.randn(2, 64),
        rng.standard_normal((2, 64)).astype(np.float32),
    ]
    budgets = [[4], [2, 3], [1], [4, 2], [3]]
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_wait_ms=3000))
    try:
        with batcher.arriving():  # hold the batch open until every job is queued
            futures = [
                batcher.submit(EncodeJob(budgets=b, activations=x, fvu=True))
                for x, b in zip(inputs, budgets)
            ]
        outputs = [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert batcher.stats.batches == 1
    for x, b, out in zip(inputs, budgets, outputs):
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        ref = sae.encode(t.float(), max(b))
        assert isinstance(out.values, np.ndarray) and out.values.dtype == np.float32
        assert isinstance(out.indices, np.ndarray) and out.indices.dtype == np.int32
        np.testing.assert_array_equal(out.indices, ref.indices.numpy())
        np.testing.assert_allclose(out.values, ref.values.numpy(), rtol=1e-5, atol=1e-6)
        assert out.fvu is not None and tuple(out.fvu.shape) == (len(b), t.shape[0])


def test_closed_loop_clients_merge_into_one_batch(sae):
    """Client A is answered while client B waits in the queue: the next batch expects both
    (A sends again), and its wait counts from when the worker was free, not from when B
    queued - so B and A's next request share a batch instead of alternating forever."""
    batcher = Batcher(DelayedBackend(sae, delay=1.0), None, BatcherConfig(max_wait_ms=1500))
    try:
        a1 = batcher.submit(EncodeJob(budgets=[4], activations=torch.randn(1, 64)))
        time.sleep(0.1)  # a1's batch is running
        b1 = batcher.submit(EncodeJob(budgets=[4], activations=torch.randn(1, 64)))
        a1.result(30)  # the worker is free at ~1.0 s; B queued at ~0.1 s
        time.sleep(0.9)  # past B's queue time + max_wait, within free time + max_wait
        assert not b1.done()  # B waits for A's next request
        a2 = batcher.submit(EncodeJob(budgets=[4], activations=torch.randn(1, 64)))
        b1.result(30), a2.result(30)
        assert batcher.stats.batches == 2 and batcher.stats.rows == 3
    finally:
        batcher.close()


class ThreadRecordingBackend(TorchBackend):
    """The torch backend, noting the thread of every model call."""

    def __init__(self, sae) -> None:
        super().__init__(sae)
        self.threads: set[str] = set()

    def encode(self, x, k):
        self.threads.add(threading.current_thread().name)
        return super().encode(x, k)

    def reconstruct_from_code(self, code, budgets):
        self.threads.add(threading.current_thread().name)
        return super().reconstruct_from_code(code, budgets)


def test_decode_jobs_run_on_the_worker_beside_encodes(sae):
    backend = ThreadRecordingBackend(sae)
    batcher = Batcher(backend, None, BatcherConfig(max_wait_ms=200))
    x = torch.randn(5, 64)
    code = sae.encode(x, 8)
    try:
        with batcher.arriving():  # both jobs join one batch
            decoded = batcher.submit(DecodeJob(code, [8, 3]))
            encoded = batcher.submit(EncodeJob(budgets=[4], activations=x))
        recons = decoded.result(30)
        np.testing.assert_array_equal(encoded.result(30).indices, code.indices[:, :4])
    finally:
        batcher.close()
    torch.testing.assert_close(recons, sae.reconstruct_from_code(code, [8, 3]).detach())
    assert backend.threads == {"hsae-batcher"}
    assert (batcher.stats.batches, batcher.stats.decodes) == (1, 1)


def test_a_long_decode_runs_in_chunks_and_joins(sae):
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_chunk_tokens=4))
    code = sae.encode(torch.randn(10, 64), 6)
    masked = SparseCode(code.values, code.indices.clone())
    masked.indices[2, 4:] = -1  # skipped entries stay skipped in every chunk
    try:
        recons = batcher.run(DecodeJob(masked, [2, 6]), timeout=30)
    finally:
        batcher.close()
    assert recons.shape == (2, 10, 64)
    want = sae.reconstruct_from_code(masked, [2, 6]).detach()
    torch.testing.assert_close(recons, want, rtol=1e-5, atol=1e-5)
    assert (batcher.stats.chunks, batcher.stats.decodes) == (3, 3)  # rows 0-3, 4-7, 8-9
