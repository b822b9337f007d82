"""Long jobs in the batcher run in chunks interleaved with other work (no gRPC, except the last
test): same results as one forward, a short job finishes after at most one chunk of a long one,
cancellation / deadlines stop a long job between chunks, a failing chunk fails only its job.

Ordering is checked with a capture that records events and holds the first chunk until the
test releases it, never with wall-clock thresholds.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from serving_helpers import BUG_VALUE, HOOKPOINT, DelayedBackend, direct_encode

from hsae_runtime.lm import PrefixCache, capture
from hsae_runtime.sae import per_token_fvu
from hsae_runtime.serving.backend import TorchBackend
from hsae_runtime.serving.batcher import Batcher
from hsae_runtime.serving.errors import CancelledError, DeadlineError
from hsae_runtime.serving.jobs import EncodeJob, LMInput
from hsae_runtime.serving.limits import BatcherConfig

pytestmark = pytest.mark.timeout(120)

CHUNK = 16


class GatedCapture:
    """The tiny LM's capture; records ``("chunk", start)`` / ``("batch", B)`` per call and holds
    the first call until :attr:`release` is set (``started`` says it is running)."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.events: list[tuple[str, int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, ids, mask, cache: PrefixCache | None = None):
        if cache is None:
            self.events.append(("batch", ids.shape[0]))
        else:
            self.events.append(("chunk", cache.length))
        if not self.started.is_set():
            self.started.set()
            assert self.release.wait(30)
        return capture(self.lm, HOOKPOINT, ids, mask, cache=cache)

    def note(self, name: str):
        """A future callback recording ``(name, 0)`` when the future resolves."""
        return lambda _future: self.events.append((name, 0))


def _lm_job(lm, n_tokens: int, seed: int = 0, **kwargs) -> EncodeJob:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(lm.tokenizer), (n_tokens,), generator=gen)
    ids[0] = lm.tokenizer.bos_token_id
    return EncodeJob(lm_input=LMInput(ids, ids != lm.tokenizer.bos_token_id), **kwargs)


def test_long_lm_job_in_chunks_equals_one_forward(lm, sae):
    job = _lm_job(lm, 100, budgets=[4, 16], reconstructions=True, fvu=True)
    gated = GatedCapture(lm)
    gated.release.set()
    batcher = Batcher(TorchBackend(sae), gated, BatcherConfig(max_chunk_tokens=CHUNK))
    future = batcher.submit(job)
    batcher.close()  # drains the long job too
    out = future.result(0)
    assert job.lm_input is not None
    whole = capture(lm, HOOKPOINT, job.lm_input.token_ids[None])[0]  # (T, d_in)
    x = whole[job.lm_input.keep]  # (99, d_in): BOS dropped
    ref = sae.encode(x, 16)
    assert batcher.stats.chunks == 7 and batcher.stats.lm_forwards == 7  # ceil(100 / 16)
    assert [e[1] for e in gated.events] == list(range(0, 100, CHUNK))
    np.testing.assert_array_equal(out.indices, ref.indices.numpy())
    np.testing.assert_allclose(out.values, ref.values.numpy(), rtol=1e-4, atol=1e-5)
    recon = sae.reconstruct_from_code(ref, [4, 16])  # (2, 99, d_in)
    assert out.reconstructions is not None and out.fvu is not None
    torch.testing.assert_close(out.reconstructions, recon, rtol=1e-4, atol=1e-4)
    fvu = per_token_fvu(x, recon, sae.b_dec.float())
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-4, atol=1e-5)


def test_long_activation_job_in_chunks_equals_one_encode(sae):
    x = torch.randn(50, 64)
    batcher = Batcher(TorchBackend(sae), None, BatcherConfig(max_chunk_tokens=CHUNK))
    try:
        out = batcher.run(EncodeJob(budgets=[2, 8], activations=x.numpy(), fvu=True), timeout=30)
    finally:
        batcher.close()
    ref = sae.encode(x, 8)
    assert batcher.stats.chunks == 4 and batcher.stats.lm_forwards == 0
    np.testing.assert_array_equal(out.indices, ref.indices.numpy())
    np.testing.assert_allclose(out.values, ref.values.numpy(), rtol=1e-5, atol=1e-6)
    assert out.fvu is not None and tuple(out.fvu.shape) == (2, 50)


def _short_behind_long(lm, sae, max_chunk_tokens: int, short: EncodeJob) -> list[tuple[str, int]]:
    """Submit a long LM job (8 chunks of :data:`CHUNK` tokens), then ``short`` once the long
    job's first capture runs; returns the events, with ``("long done" | "short done", 0)``."""
    gated = GatedCapture(lm)
    batcher = Batcher(TorchBackend(sae), gated, BatcherConfig(max_chunk_tokens=max_chunk_tokens))
    try:
        long_future = batcher.submit(_lm_job(lm, 8 * CHUNK, budgets=[8]))
        long_future.add_done_callback(gated.note("long done"))
        assert gated.started.wait(30)  # the long job's first capture is running
        short_future = batcher.submit(short)
        short_future.add_done_callback(gated.note("short done"))
        gated.release.set()
        short_future.result(30)
        long_future.result(30)
    finally:
        batcher.close()
    return gated.events


@pytest.mark.parametrize("short_kind", ["activations", "text"])
def test_short_job_waits_for_at_most_one_chunk(lm, sae, short_kind):
    if short_kind == "activations":
        short = EncodeJob(budgets=[4], activations=np.ones((1, 64), np.float32))
    else:
        short = _lm_job(lm, 5, seed=1, budgets=[4])
    events = _short_behind_long(lm, sae, CHUNK, short)
    chunks = [e for e in events if e[0] == "chunk"]
    assert len(chunks) == 8
    done = events.index(("short done", 0))
    assert events[:done] == [("chunk", 0)] + ([("batch", 1)] if short_kind == "text" else [])
    assert events[-1] == ("long done", 0)


def test_without_chunks_a_short_job_waits_for_the_long_one(lm, sae):
    """The same scenario with ``max_chunk_tokens=0``: the long job runs whole, first."""
    short = EncodeJob(budgets=[4], activations=np.ones((1, 64), np.float32))
    events = _short_behind_long(lm, sae, 0, short)
    assert events == [("batch", 1), ("long done", 0), ("short done", 0)]


@pytest.mark.parametrize("how", ["cancel", "deadline", "client gone"])
def test_a_long_job_stops_between_chunks(lm, sae, how):
    gated = GatedCapture(lm)
    batcher = Batcher(TorchBackend(sae), gated, BatcherConfig(max_chunk_tokens=CHUNK))
    active = True
    job = _lm_job(lm, 8 * CHUNK, budgets=[8], is_active=lambda: active)
    try:
        future = batcher.submit(job)
        assert gated.started.wait(30)
        if how == "cancel":
            job.cancel()
        elif how == "deadline":
            job.deadline = time.monotonic() - 1.0
        else:
            active = False
        gated.release.set()
        error = CancelledError if how != "deadline" else DeadlineError
        with pytest.raises(error):
            future.result(30)
        # The worker goes on serving.
        later = batcher.run(EncodeJob(budgets=[4], activations=np.ones((1, 64), np.float32)), 30)
        assert later.indices.shape == (1, 4)
    finally:
        batcher.close()
    assert [e for e in gated.events if e[0] == "chunk"] == [("chunk", 0)]
    assert batcher.stats.dropped == 1


def test_a_failing_chunk_fails_only_its_job(lm, sae):
    bad = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    bad[40, 3] = BUG_VALUE  # in the third chunk
    gated = GatedCapture(lm)
    batcher = Batcher(DelayedBackend(sae), gated, BatcherConfig(max_chunk_tokens=CHUNK))
    try:
        good_future = batcher.submit(_lm_job(lm, 4 * CHUNK, budgets=[8]))
        assert gated.started.wait(30)
        bad_future = batcher.submit(EncodeJob(budgets=[4], activations=bad))
        short_future = batcher.submit(EncodeJob(budgets=[4], activations=bad[:2]))
        gated.release.set()
        with pytest.raises(RuntimeError, match="simulated bug"):
            bad_future.result(30)
        assert good_future.result(30).indices.shape == (4 * CHUNK - 1, 8)
        assert short_future.result(30).indices.shape == (2, 4)
    finally:
        batcher.close()
    assert batcher.stats.chunks == 4 + 3  # the bad job stopped at its failing chunk


def test_long_text_through_the_server(lm, sae, tiny_sae_path):
    """``load_and_start`` wires the LM's chunked capture: a text of several chunks is encoded as
    one forward would encode it."""
    from hsae_runtime.client import Client
    from hsae_runtime.serving import server as srv

    options = srv.ServerOptions(port=0, batching=BatcherConfig(max_chunk_tokens=8))
    running = srv.load_and_start(tiny_sae_path, device="cpu", options=options)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    try:
        with Client(f"127.0.0.1:{running.port}") as client:
            res = client.encode(text=text, budgets=[4, 16])
    finally:
        running.stop(grace=2)
    ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
    assert running.batcher.stats.chunks == -(-len(ids) // 8) > 4
    _, ref = direct_encode(lm, sae, ids, 16)
    np.testing.assert_array_equal(res.indices, ref.indices.numpy())
    np.testing.assert_allclose(res.values, ref.values.numpy(), rtol=1e-4, atol=1e-5)
