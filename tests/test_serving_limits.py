"""Server limits under hostile or unlucky load: idle streams, huge texts, draining on shutdown.

Every server here runs on 127.0.0.1 (port 0) over the tiny SAE (and tiny LM); loops are bounded
and waits are short, so the module takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import mmap
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import HOOKPOINT, DelayedBackend

from hsae_runtime.errors import InputError
from hsae_runtime.lm import capture
from hsae_runtime.serving import build_proto

build_proto.ensure()

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from hsae_runtime.client import Client, ServerError  # noqa: E402
from hsae_runtime.serving import server as srv  # noqa: E402
from hsae_runtime.serving.limits import ServingLimits  # noqa: E402
from hsae_runtime.serving.stubs import load as load_stubs  # noqa: E402
from hsae_runtime.serving.tokenise import BoundedTokeniser, longest_token_chars  # noqa: E402

pb, pb_grpc = load_stubs()
pytestmark = pytest.mark.timeout(120)
X = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start(sae, lm=None, *, delay: float = 0.0, max_workers: int = 64, **limits: Any):
    options = srv.ServerOptions(
        port=0,
        max_workers=max_workers,
        limits=ServingLimits(**{"max_message_bytes": 64 * 2**20, **limits}),
    )
    backend = DelayedBackend(sae, delay)
    if lm is None:
        return srv.start(backend, options=options)

    def run_lm(ids, mask, cache=None):  # cache: the batcher's chunked path, when it has one
        if cache is None:
            return capture(lm, HOOKPOINT, ids, mask)
        return capture(lm, HOOKPOINT, ids, mask, cache=cache)

    return srv.start(backend, lm=lm, hookpoint=HOOKPOINT, capture=run_lm, options=options)


def health(channel: grpc.Channel, timeout: float = 2.0) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="hsae.v1.HSAE"), timeout=timeout
    )
    return reply.status


class Requests:
    """A request iterator for a raw EncodeStream that sends what is put and blocks otherwise."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()

    def send(self, request: Any) -> None:
        self._q.put(request)

    def close(self) -> None:
        self._q.put(None)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._q.get()) is not None:
            yield item


def act_request(request_id: str = "") -> Any:
    return pb.EncodeRequest(
        activations=pb.Tensor(data=X.tobytes(), shape=list(X.shape), dtype=pb.DTYPE_FLOAT32),
        budgets=[4],
        request_id=request_id,
    )


# ---------------------------------------------------------------------------- threads
def test_idle_streams_neither_freeze_health_nor_take_every_thread(sae):
    running = start(sae)  # the defaults: 64 handler threads, 16 streams
    address = f"127.0.0.1:{running.port}"
    feeds = [Requests() for _ in range(70)]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.HSAEStub(channel)
            calls = [stub.EncodeStream(iter(feed)) for feed in feeds]
            deadline = time.monotonic() + 20
            while sum(c.done() for c in calls) < 70 - 16 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [c for c in calls if c.done()]
            assert len(refused) == 70 - 16
            for call in refused:
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-streams" in call.details()
            assert running.servicer.gate.streams == 16
            assert health(channel) == SERVING  # within its 2 s deadline
            with Client(address, timeout=5) as client:
                assert client.info().k_max == 16
                assert client.encode(activations=X, budgets=[4]).k == 4
            for call in calls:
                call.cancel()
    finally:
        for feed in feeds:
            feed.close()
        running.stop(grace=1)


def test_health_and_info_answer_while_every_handler_thread_is_busy(sae):
    running = start(sae, delay=3.0, max_workers=2, max_streams=1)
    address = f"127.0.0.1:{running.port}"
    results: list[object] = []

    def slow() -> None:
        with Client(address, timeout=30) as c:
            results.append(c.encode(activations=X, budgets=[4]).k)

    callers = [threading.Thread(target=slow) for _ in range(2)]  # one per handler thread
    try:
        for t in callers:
            t.start()
        time.sleep(0.5)  # both handler threads now wait for the slow batch (3 s)
        with grpc.insecure_channel(address) as channel:
            assert health(channel, timeout=1.5) == SERVING
            info = pb_grpc.HSAEStub(channel).Info(pb.InfoRequest(), timeout=1.5)
            assert info.k_max == 16
        for t in callers:
            t.join(30)
        assert results == [4] * 2
    finally:
        running.stop(grace=1)


def test_idle_stream_is_closed_with_a_clear_status(sae):
    running = start(sae, stream_idle_timeout_s=0.5)
    feed = Requests()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            replies = pb_grpc.HSAEStub(channel).EncodeStream(iter(feed))
            feed.send(act_request("a"))
            assert next(replies).request_id == "a"  # answered; the idle clock starts now
            t = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                next(replies)
            waited = time.perf_counter() - t
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            assert "--stream-idle-timeout-s" in info.value.details()  # type: ignore[attr-defined]
            assert 0.3 < waited < 5
        deadline = time.monotonic() + 5
        while running.servicer.gate.streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.servicer.gate.streams == 0  # its slot is free again
    finally:
        feed.close()
        running.stop(grace=1)


def test_stream_cap_must_leave_threads_for_unary_calls():
    with pytest.raises(ValueError, match="max_streams"):
        srv.ServerOptions(max_workers=8, limits=ServingLimits(max_streams=5))
    with pytest.raises(ValueError, match="stream_idle_timeout_s"):
        ServingLimits(stream_idle_timeout_s=0)


# ---------------------------------------------------------------------------- text size
class SpyTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.calls: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.calls.append(len(text))
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_huge_text_is_refused_before_tokenising(sae, lm):
    spy = SpyTokenizer(lm.tokenizer)
    running = start(sae, dataclasses.replace(lm, tokenizer=spy), max_request_tokens=512)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=60) as client:
            assert client.encode(text="The lazy dog.", budgets=[4]).k == 4  # text is served
            spy.calls.clear()
            text = "the quick brown fox " * (10 * 2**20 // 20)  # 10 MiB
            with pytest.raises(ServerError) as info:
                client.encode(text=text, budgets=[4])
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "text too long" in str(info.value) and "max_request_tokens=512" in str(
                info.value
            )
            assert spy.calls == []  # refused from its length alone, nothing tokenised
            assert client.encode(text="Still serving.", budgets=[4]).k == 4
    finally:
        running.stop(grace=1)


def test_long_text_is_counted_in_pieces_and_tokenised_exactly(lm):
    spy = SpyTokenizer(lm.tokenizer)
    longest = longest_token_chars(lm.tokenizer)
    assert longest is not None and longest >= len("<bos>")
    tok = BoundedTokeniser(spy, max_tokens=300, max_token_chars=longest, piece_chars=128)
    # Digits and spaces tokenise to about a token per two characters: far over 300 tokens,
    # yet short enough to pass the length bound.
    text = " ".join(str(i % 10) for i in range(tok.max_chars // 2 - 1))  # type: ignore[operator]
    assert len(text) <= tok.max_chars  # type: ignore[operator]
    with pytest.raises(InputError, match="too many tokens"):
        tok(text)
    assert spy.calls and max(spy.calls) <= 128  # never the whole text
    assert sum(spy.calls) < len(text)  # stopped before the end
    # A text over one piece but within the limit gets exactly the tokenizer's ids.
    ok = "The quick brown fox jumps over the lazy dog. " * 8
    assert len(ok) > 128
    expected = list(lm.tokenizer(ok, add_special_tokens=True)["input_ids"])
    assert len(expected) <= 300
    assert tok(ok) == expected


def test_token_list_over_the_limit_is_refused(sae, lm):
    running = start(sae, lm, max_request_tokens=512)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.HSAEStub(channel)
            request = pb.EncodeRequest(tokens=pb.TokenIds(ids=[5] * 100_000), budgets=[4])
            with pytest.raises(grpc.RpcError) as info:
                stub.Encode(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert "100000 > max_request_tokens=512" in info.value.details()  # type: ignore[attr-defined]
    finally:
        running.stop(grace=1)


# ---------------------------------------------------------------------------- shutdown
def test_stop_drains_with_not_serving_and_answers_what_was_received(sae):
    running = start(sae, delay=1.5)
    address = f"127.0.0.1:{running.port}"
    results: list[object] = []
    feed = Requests()

    def unary() -> None:
        with Client(address, timeout=30) as c:
            results.append(c.encode(activations=X, budgets=[4]).k)

    callers = [threading.Thread(target=unary) for _ in range(3)]
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 20})
    try:
        with grpc.insecure_channel(address) as channel:
            replies = pb_grpc.HSAEStub(channel).EncodeStream(iter(feed))
            feed.send(act_request("s1"))
            feed.send(act_request("s2"))
            for t in callers:
                t.start()
            time.sleep(0.4)  # all five requests are in the batcher now
            stopper.start()
            time.sleep(0.2)
            # Draining: the port is open, health says NOT_SERVING, new work is refused.
            assert health(channel) == NOT_SERVING
            with Client(address, timeout=5) as late:
                with pytest.raises(ServerError) as info:
                    late.encode(activations=X, budgets=[4])
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in str(info.value)
                assert late.info().k_max == 16  # Info still answers
            # The stream's received items are answered, then it ends with UNAVAILABLE.
            got = [next(replies), next(replies)]
            assert [r.request_id for r in got] == ["s1", "s2"]
            assert all(not r.HasField("error") and r.k == 4 for r in got)
            with pytest.raises(grpc.RpcError) as stream_end:
                next(replies)
            assert stream_end.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "was answered" in stream_end.value.details()  # type: ignore[attr-defined]
        for t in callers:
            t.join(30)
        stopper.join(30)
        assert results == [4, 4, 4]  # every in-flight unary call finished
    finally:
        feed.close()
        running.stop(grace=0)


def test_calls_still_waiting_when_the_grace_ends_get_unavailable(sae):
    running = start(sae, delay=3.0)
    address = f"127.0.0.1:{running.port}"
    errors: list[ServerError] = []

    def unary() -> None:
        with Client(address, timeout=30) as c:
            try:
                c.encode(activations=X, budgets=[4])
            except ServerError as err:
                errors.append(err)

    callers = [threading.Thread(target=unary) for _ in range(2)]
    for t in callers:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    running.stop(grace=0.3)
    for t in callers:
        t.join(30)
    assert time.perf_counter() - t0 < 6
    assert len(errors) == 2
    for err in errors:
        assert err.code == grpc.StatusCode.UNAVAILABLE  # not CANCELLED, not silence
        assert "grace period ran out" in str(err)


# ---------------------------------------------------------------------------- memory
def _present_pages(t) -> tuple[int, int]:
    """(pages of ``t``'s memory mapped in this process, all its pages), from /proc/self/pagemap."""
    start, size = t.data_ptr(), t.numel() * t.element_size()
    first, last = start // mmap.PAGESIZE, (start + size - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
    return sum(e >> 63 for e in entries), len(entries)


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux /proc")
def test_embedding_matrix_is_paged_in_when_serving_starts(tmp_path, sae, lm, monkeypatch):
    # A memory-mapped weight (as from_pretrained leaves safetensors weights) counts in RSS
    # only once read; the server reads the whole embedding matrix at start, so RSS does not
    # climb with every new token id.
    path = tmp_path / "embedding.bin"
    np.zeros(300 * 1024, np.float32).tofile(path)  # 300 pages
    weight = torch.from_file(str(path), shared=False, size=300 * 1024).view(1200, 256)
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding.from_pretrained(weight)  # type: ignore[assignment]
    present, total = _present_pages(weight)
    assert present < total  # nothing has read it yet
    srv.page_in_embeddings(model)
    assert _present_pages(weight) == (total, total)

    seen = []
    monkeypatch.setattr(srv, "page_in_embeddings", seen.append)
    start(sae, lm).stop(grace=0)
    assert seen == [lm.model]
