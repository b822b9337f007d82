"""The gRPC server end to end on 127.0.0.1 (port 0): tiny random Gemma-2 + tiny SAE.

Round trips must equal a direct ``sae.encode`` for text, token ids and activations; nested
budgets come from one code; every error class maps to its status and the server keeps serving;
concurrent requests are coalesced into fewer LM forwards.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from hsae_runtime.serving import build_proto

build_proto.ensure()  # generated stubs are build outputs: make sure they exist and are current

from hsae_runtime.client import Client, ServerError, format_table  # noqa: E402
from hsae_runtime.lm import capture, load_lm, special_token_mask  # noqa: E402
from hsae_runtime.sae import SAE, SparseCode, per_token_fvu  # noqa: E402
from hsae_runtime.serving import server as srv  # noqa: E402
from hsae_runtime.serving.backend import TorchBackend  # noqa: E402
from hsae_runtime.serving.batcher import BatcherConfig  # noqa: E402
from hsae_runtime.serving.servicer import ServingLimits  # noqa: E402
from hsae_runtime.serving.stubs import load as load_stubs  # noqa: E402

pb, pb_grpc = load_stubs()

HOOKPOINT = "model.layers.1"
TEXT = "The quick brown fox jumps over the lazy dog."
MAX_MESSAGE = 256 * 2**10
MAX_TOKENS = 512

pytestmark = pytest.mark.timeout(120)


class SlowBackend:
    """Wraps a backend: sleeps before each encode; raises on a magic row (a fake bug)."""

    def __init__(self, inner: TorchBackend, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.config, self.device = inner.name, inner.config, inner.device

    def encode(self, x: torch.Tensor, k: int) -> SparseCode:
        time.sleep(self.delay)
        if bool((x == 12345.0).any()):
            raise RuntimeError("simulated bug")
        return self.inner.encode(x, k)

    def reconstruct_from_code(self, code, budgets):
        return self.inner.reconstruct_from_code(code, budgets)

    def fvu_center(self) -> torch.Tensor:
        return self.inner.fvu_center()


@pytest.fixture(scope="module")
def lm(tiny_lm_dir: Path):
    return load_lm(tiny_lm_dir, device="cpu")


@pytest.fixture(scope="module")
def sae(tiny_sae_path: Path) -> SAE:
    return SAE.load(tiny_sae_path).requires_grad_(False)


def _start(sae, lm=None, *, delay=0.0, **batching) -> srv.RunningServer:
    backend = SlowBackend(TorchBackend(sae), delay)
    options = srv.ServerOptions(
        port=0,
        limits=ServingLimits(max_request_tokens=MAX_TOKENS, max_message_bytes=MAX_MESSAGE),
        batching=BatcherConfig(**{"max_wait_ms": 2.0, **batching}),
    )
    if lm is None:
        return srv.start(backend, options=options)
    return srv.start(
        backend,
        lm=lm,
        hookpoint=HOOKPOINT,
        capture=lambda ids, mask: capture(lm, HOOKPOINT, ids, mask),
        options=options,
    )


@pytest.fixture(scope="module")
def server(sae, lm):
    running = _start(sae, lm)
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def _direct(lm, sae, ids: list[int], k: int, include_special: bool = False):
    ids_t = torch.tensor([ids])
    acts = capture(lm, HOOKPOINT, ids_t)[0]  # (T, d_in)
    keep = torch.ones(len(ids), dtype=torch.bool)
    if not include_special:
        keep = ~special_token_mask(lm.tokenizer, ids_t)[0]
    x = acts[keep]
    return x, sae.encode(x, k)


# ---------------------------------------------------------------------------- round trips
def test_info(client, sae, lm):
    info = client.info()
    assert (info.d_in, info.d_sae, info.k_max) == (64, 256, 16)
    assert info.has_lm and info.hookpoint == HOOKPOINT and info.lm_name == lm.name
    assert info.trained_budgets == sae.config.trained_budgets
    assert info.max_message_bytes == MAX_MESSAGE and info.backend == "torch"


def test_text_round_trip_equals_direct_encode(client, lm, sae):
    res = client.encode(text=TEXT, budgets=[4, 16])
    ids = lm.tokenizer(TEXT)["input_ids"]
    _, code = _direct(lm, sae, ids, 16)
    assert res.k == 16 and res.values.shape == (len(ids) - 1, 16)  # BOS skipped
    np.testing.assert_array_equal(res.indices, code.indices.numpy())
    np.testing.assert_allclose(res.values, code.values.numpy(), rtol=1e-5, atol=1e-6)
    assert res.positions.tolist() == list(range(1, len(ids)))
    assert res.token_ids.tolist() == ids[1:]
    assert "".join(res.tokens) == TEXT
    values4, indices4 = res.codes(4)
    np.testing.assert_array_equal(indices4, code.indices[:, :4].numpy())
    assert "fvu" not in format_table(res) and "|" in format_table(res)


def test_tokens_round_trip_with_special_tokens(client, lm, sae):
    ids = lm.tokenizer("Sparse autoencoders")["input_ids"]
    res = client.encode(tokens=ids, budgets=[8], include_special_tokens=True)
    _, code = _direct(lm, sae, ids, 8, include_special=True)
    assert res.positions.tolist() == list(range(len(ids)))
    np.testing.assert_array_equal(res.indices, code.indices.numpy())
    np.testing.assert_allclose(res.values, code.values.numpy(), rtol=1e-5, atol=1e-6)


def test_activations_round_trip_keeps_leading_dims(client, sae):
    x = torch.randn(2, 5, 64)
    res = client.encode(activations=x.numpy(), budgets=[3, 7])
    code = sae.encode(x, 7)
    assert res.indices.shape == (2, 5, 7) and res.indices.dtype == np.int32
    np.testing.assert_array_equal(res.indices, code.indices.numpy())
    np.testing.assert_allclose(res.values, code.values.numpy(), rtol=1e-5, atol=1e-6)
    half = client.encode(activations=x, budgets=[7], output_dtype="float16")
    assert half.values.dtype == np.float16
    np.testing.assert_allclose(half.values, code.values.numpy(), rtol=2e-3, atol=2e-3)


def test_nested_budgets_reconstructions_and_fvu(client, sae):
    x = torch.randn(6, 64)
    budgets = [16, 2, 8]
    res = client.encode(activations=x, budgets=budgets, reconstructions=True, fvu=True)
    expected = sae.reconstruct(x, budgets)  # (3, 6, 64)
    assert res.k == 16 and sorted(res.reconstructions) == [2, 8, 16]
    for i, b in enumerate(budgets):
        np.testing.assert_allclose(res.reconstructions[b], expected[i].detach().numpy(), atol=1e-5)
        want = per_token_fvu(x, expected[i], sae.b_dec).detach().numpy()
        np.testing.assert_allclose(res.fvu[b], want, rtol=1e-4, atol=1e-6)
        vb, ib = res.codes(b)
        np.testing.assert_array_equal(ib, sae.encode(x, b).indices.numpy())


def test_decode_round_trip(client, sae):
    x = torch.randn(3, 4, 64)
    res = client.encode(activations=x, budgets=[12])
    whole = client.decode(res.indices, res.values)
    assert whole.shape == (3, 4, 64)
    np.testing.assert_allclose(whole, sae.reconstruct(x, [12])[0].detach().numpy(), atol=1e-5)
    nested = client.decode(res.indices, res.values, budgets=[4, 12])
    assert nested.shape == (2, 3, 4, 64)
    np.testing.assert_allclose(nested[0], sae.reconstruct(x, [4])[0].detach().numpy(), atol=1e-5)


def test_stream_answers_in_order_and_survives_bad_items(client, sae):
    xs = [torch.randn(n, 64) for n in (1, 3, 2)]
    items = [
        {"activations": xs[0], "budgets": [4], "request_id": "a"},
        {"activations": xs[1], "budgets": [99], "request_id": "bad"},
        {"text": TEXT, "budgets": [4, 8], "request_id": "t"},
        {"activations": xs[2], "budgets": [16], "request_id": "c"},
    ]
    out = list(client.stream(items, raise_errors=False))
    assert len(out) == 4
    assert isinstance(out[1], ServerError) and out[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.request_id for r in out if not isinstance(r, ServerError)] == ["a", "t", "c"]
    np.testing.assert_array_equal(out[3].indices, sae.encode(xs[2], 16).indices.numpy())
    with pytest.raises(ServerError, match="INVALID_ARGUMENT"):
        list(client.stream(items))


# ---------------------------------------------------------------------------- errors
def _raw(**fields):
    return pb.EncodeRequest(**fields)


def _acts(x: np.ndarray, dtype=None):
    dtype = dtype if dtype is not None else pb.DTYPE_FLOAT32
    return pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=dtype)


GOOD = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
NAN = GOOD.copy()
NAN[0, 3] = np.nan
INF = GOOD.copy()
INF[1, 0] = np.inf
INVALID = grpc.StatusCode.INVALID_ARGUMENT

ERROR_CASES = {
    "budget_zero": (_raw(activations=_acts(GOOD), budgets=[0]), INVALID),
    "budget_over_k_max": (_raw(activations=_acts(GOOD), budgets=[17]), INVALID),
    "no_budgets": (_raw(activations=_acts(GOOD)), INVALID),
    "no_input": (_raw(budgets=[4]), INVALID),
    "wrong_width": (_raw(activations=_acts(GOOD[:, :32].copy()), budgets=[4]), INVALID),
    "wrong_dtype": (
        _raw(activations=_acts(GOOD.view(np.int32), pb.DTYPE_INT32), budgets=[4]),
        INVALID,
    ),
    "byte_count": (
        _raw(
            activations=pb.Tensor(data=b"\0" * 12, shape=[2, 64], dtype=pb.DTYPE_FLOAT32),
            budgets=[4],
        ),
        INVALID,
    ),
    "nan": (_raw(activations=_acts(NAN), budgets=[4]), INVALID),
    "inf": (_raw(activations=_acts(INF), budgets=[4]), INVALID),
    "empty_activations": (
        _raw(activations=_acts(np.zeros((0, 64), np.float32)), budgets=[4]),
        INVALID,
    ),
    "empty_text": (_raw(text="  ", budgets=[4]), INVALID),
    "empty_tokens": (_raw(tokens=pb.TokenIds(ids=[]), budgets=[4]), INVALID),
    "token_out_of_vocab": (_raw(tokens=pb.TokenIds(ids=[5, 10**6]), budgets=[4]), INVALID),
    "only_special_tokens": (_raw(tokens=pb.TokenIds(ids=[2]), budgets=[4]), INVALID),
    "too_many_tokens": (_raw(tokens=pb.TokenIds(ids=[5] * (MAX_TOKENS + 1)), budgets=[4]), INVALID),
    "too_many_rows": (
        _raw(activations=_acts(np.zeros((MAX_TOKENS + 1, 64), np.float32)), budgets=[4]),
        INVALID,
    ),
    "bad_output_dtype": (
        _raw(activations=_acts(GOOD), budgets=[4], output_dtype=pb.DTYPE_INT32),
        INVALID,
    ),
    "oversize_request": (
        _raw(activations=_acts(np.zeros((1200, 64), np.float32)), budgets=[4]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "oversize_response": (
        _raw(
            activations=_acts(np.ones((MAX_TOKENS, 64), np.float32)),
            budgets=list(range(1, 17)),
            return_reconstructions=True,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "internal_bug": (
        _raw(activations=_acts(np.full((1, 64), 12345.0, np.float32)), budgets=[4]),
        grpc.StatusCode.INTERNAL,
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_each_error_maps_to_its_status_and_server_keeps_serving(server, client, case):
    request, code = ERROR_CASES[case]
    stub = pb_grpc.HSAEStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert info.value.details()
    if code == grpc.StatusCode.INTERNAL:
        assert "simulated bug" not in info.value.details()  # internals stay in the server log
    assert client.encode(activations=GOOD, budgets=[4]).k == 4


def test_decode_errors(client):
    idx = np.array([[1, 2, 300]], np.int32)
    with pytest.raises(ServerError) as info:
        client.decode(idx, np.ones((1, 3), np.float32))
    assert info.value.code == INVALID
    with pytest.raises(ServerError) as info:
        client.decode(idx[:, :2], np.ones((1, 2), np.float32), budgets=[3])
    assert info.value.code == INVALID
    with pytest.raises(ServerError) as info:
        client.decode(idx[:, :2], np.array([[1.0, np.nan]], np.float32))
    assert info.value.code == INVALID


def test_no_lm_server_refuses_text_but_serves_activations(sae):
    running = _start(sae)
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            assert not c.info().has_lm
            with pytest.raises(ServerError) as info:
                c.encode(text="hello", budgets=[4])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert c.encode(activations=GOOD, budgets=[4]).indices.shape == (2, 4)
    finally:
        running.stop(grace=1)


def test_full_queue_and_deadline(sae):
    running = _start(sae, delay=0.3, max_queue=1, batching=False)
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


# ---------------------------------------------------------------------------- batching
def test_concurrent_requests_are_coalesced(sae, lm):
    running = _start(sae, lm, max_wait_ms=1000)
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
            _, code = _direct(lm, sae, lm.tokenizer(text)["input_ids"], 8)
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


def test_cancelled_request_is_dropped_before_the_model_runs(sae):
    running = _start(sae, delay=0.4, batching=False)
    request = _raw(activations=_acts(GOOD), budgets=[4])
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
