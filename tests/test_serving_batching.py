"""Serving under load, end to end on 127.0.0.1: the bounded queue and deadlines, coalescing
of concurrent requests into one LM forward, cancellation before the model runs, and the ONNX
backend behind the same server. (The batcher alone: ``test_batcher.py``.)
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import (
    GOOD,
    TEXT,
    direct_encode,
    pb_grpc,
    req,
    start_server,
    wire,
)

from hsae_runtime.client import Client, ServerError
from hsae_runtime.sae import per_token_fvu
from hsae_runtime.serving import server as srv

pytestmark = pytest.mark.timeout(120)


def test_full_queue_and_deadline(sae):
    running = start_server(sae, delay=0.3, max_queue=1, batching=False)
    codes: list[grpc.StatusCode | None] = []
    lock = threading.Lock()

    def call(c: Client) -> None:
        try:
            c.encode(activations=GOOD, budgets=[4], timeout=20)
            code = None
        except ServerError as err:
            code = err.code
        with lock:
            codes.append(code)

    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            threads = [threading.Thread(target=call, args=(c,)) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and None in codes
            with pytest.raises(ServerError) as info:
                c.encode(activations=GOOD, budgets=[4], timeout=0.1)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.4)
            assert c.encode(activations=GOOD, budgets=[4]).k == 4
    finally:
        running.stop(grace=2)


def test_concurrent_requests_are_coalesced(sae, lm):
    running = start_server(sae, lm, max_wait_ms=1000)
    texts = [TEXT, "It was the best of times", "Numbers like 42", "A", "Language models read"]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(texts))

    def call(i: int, c: Client) -> None:
        barrier.wait()
        results[i] = c.encode(text=texts[i], budgets=[8])

    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            threads = [threading.Thread(target=call, args=(i, c)) for i in range(len(texts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stats = running.batcher.stats
        assert stats.requests == len(texts)
        assert stats.lm_forwards <= 2 and stats.batches <= 2, stats
        for i, text in enumerate(texts):
            _, code = direct_encode(lm, sae, lm.tokenizer(text)["input_ids"], 8)
            got = results[i]
            np.testing.assert_allclose(got.values, code.values.numpy(), rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]
    finally:
        running.stop(grace=1)


def test_onnx_backend_serves_the_same_codes(tiny_sae_path, sae):
    pytest.importorskip("onnxruntime")
    from hsae_runtime.serving.backend import load_backend

    backend = load_backend(tiny_sae_path, backend="onnx", device="cpu")
    running = srv.start(backend, options=srv.ServerOptions(port=0))
    x = torch.randn(5, 64)
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.info().backend == "onnx"
            res = c.encode(activations=x, budgets=[4, 16], reconstructions=True, fvu=True)
            decoded = c.decode(res.indices, res.values, budgets=[16, 4])  # (2, 5, 64)
    finally:
        running.stop(grace=1)
    code = sae.encode(x, 16)
    np.testing.assert_array_equal(res.indices, code.indices.numpy())
    np.testing.assert_allclose(res.values, code.values.numpy(), rtol=1e-4, atol=1e-5)
    want = sae.reconstruct(x, [4])[0]
    np.testing.assert_allclose(res.reconstructions[4], want.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        res.fvu[4], per_token_fvu(x, want, sae.b_dec).numpy(), rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(decoded[1], want.numpy(), atol=1e-4)
    np.testing.assert_allclose(decoded[0], sae.reconstruct(x, [16])[0].numpy(), atol=1e-4)


def test_cancelled_request_is_dropped_before_the_model_runs(sae):
    running = start_server(sae, delay=0.4, batching=False)
    request = req(activations=wire(GOOD), budgets=[4])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.HSAEStub(channel)
            first = stub.Encode.future(request, timeout=30)
            time.sleep(0.1)  # the worker is now busy with `first`
            second = stub.Encode.future(request, timeout=30)
            time.sleep(0.1)
            second.cancel()
            assert first.result().k == 4
            deadline = time.monotonic() + 10
            while running.batcher.stats.dropped < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert running.batcher.stats.dropped == 1
        assert running.batcher.stats.encodes == 1
    finally:
        running.stop(grace=1)
