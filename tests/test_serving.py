"""The gRPC server end to end on 127.0.0.1 (port 0): tiny random Gemma-2 + tiny SAE.

Round trips must equal a direct ``sae.encode`` for text, token ids and activations (float32
from the client, float16 / bfloat16 raw on the wire); nested budgets come from one code; every
error class maps to its status and the server keeps serving. Queueing, coalescing and
cancellation: ``test_serving_batching.py``; TLS, tokens, health and shutdown:
``test_serving_server.py``.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import (
    BUG_VALUE,
    GOOD,
    HOOKPOINT,
    MAX_MESSAGE,
    MAX_TOKENS,
    TEXT,
    direct_encode,
    pb,
    pb_grpc,
    req,
    running_server,
    start_server,
    wire,
)

from hsae_runtime.client import Client, ServerError
from hsae_runtime.client_results import format_table
from hsae_runtime.sae import per_token_fvu

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(sae, lm):
    with running_server(sae, lm) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


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
    _, code = direct_encode(lm, sae, ids, 16)
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
    _, code = direct_encode(lm, sae, ids, 8, include_special=True)
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


def test_half_precision_activations_on_the_wire(server, sae):
    """float16 and bfloat16 request bytes (e.g. from grpcurl or a non-Python client) decode to
    the same rows the server then encodes in float32; NaN in bfloat16 is still refused."""
    x = torch.randn(3, 64)
    half = x.half()
    bf16 = x.bfloat16()
    cases = (
        (half.numpy().tobytes(), pb.DTYPE_FLOAT16, half.float()),
        (bf16.view(torch.int16).numpy().tobytes(), pb.DTYPE_BFLOAT16, bf16.float()),
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.HSAEStub(channel)
        for data, dtype, rows in cases:
            tensor = pb.Tensor(data=data, shape=[3, 64], dtype=dtype)
            resp = stub.Encode(pb.EncodeRequest(activations=tensor, budgets=[5]), timeout=30)
            code = sae.encode(rows, 5)
            indices = np.frombuffer(resp.indices.data, np.int32).reshape(3, 5)
            values = np.frombuffer(resp.values.data, np.float32).reshape(3, 5)
            np.testing.assert_array_equal(indices, code.indices.numpy())
            np.testing.assert_allclose(values, code.values.numpy(), rtol=1e-5, atol=1e-6)
        bad = bf16.clone()
        bad[1, 2] = float("nan")
        tensor = pb.Tensor(
            data=bad.view(torch.int16).numpy().tobytes(), shape=[3, 64], dtype=pb.DTYPE_BFLOAT16
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(pb.EncodeRequest(activations=tensor, budgets=[5]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


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


def test_decode_round_trip(client, sae, server):
    x = torch.randn(3, 4, 64)
    res = client.encode(activations=x, budgets=[12])
    decodes = server.batcher.stats.decodes
    whole = client.decode(res.indices, res.values)
    assert whole.shape == (3, 4, 64)
    np.testing.assert_allclose(whole, sae.reconstruct(x, [12])[0].detach().numpy(), atol=1e-5)
    nested = client.decode(res.indices, res.values, budgets=[4, 12])
    assert nested.shape == (2, 3, 4, 64)
    np.testing.assert_allclose(nested[0], sae.reconstruct(x, [4])[0].detach().numpy(), atol=1e-5)
    assert server.batcher.stats.decodes == decodes + 2  # Decode runs on the batcher's worker


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
NAN = GOOD.copy()
NAN[0, 3] = np.nan
INF = GOOD.copy()
INF[1, 0] = np.inf
INVALID = grpc.StatusCode.INVALID_ARGUMENT

ERROR_CASES = {
    "budget_zero": (req(activations=wire(GOOD), budgets=[0]), INVALID),
    "budget_over_k_max": (req(activations=wire(GOOD), budgets=[17]), INVALID),
    "no_budgets": (req(activations=wire(GOOD)), INVALID),
    "no_input": (req(budgets=[4]), INVALID),
    "wrong_width": (
        req(activations=wire(GOOD[:, :32].copy()), budgets=[4]),
        INVALID,
    ),
    "wrong_dtype": (
        req(activations=wire(GOOD.view(np.int32), pb.DTYPE_INT32), budgets=[4]),
        INVALID,
    ),
    "byte_count": (
        req(
            activations=pb.Tensor(data=b"\0" * 12, shape=[2, 64], dtype=pb.DTYPE_FLOAT32),
            budgets=[4],
        ),
        INVALID,
    ),
    "nan": (req(activations=wire(NAN), budgets=[4]), INVALID),
    "inf": (req(activations=wire(INF), budgets=[4]), INVALID),
    "empty_activations": (
        req(activations=wire(np.zeros((0, 64), np.float32)), budgets=[4]),
        INVALID,
    ),
    "empty_text": (req(text="  ", budgets=[4]), INVALID),
    "empty_tokens": (req(tokens=pb.TokenIds(ids=[]), budgets=[4]), INVALID),
    "token_out_of_vocab": (req(tokens=pb.TokenIds(ids=[5, 10**6]), budgets=[4]), INVALID),
    "only_special_tokens": (req(tokens=pb.TokenIds(ids=[2]), budgets=[4]), INVALID),
    "too_many_tokens": (
        req(tokens=pb.TokenIds(ids=[5] * (MAX_TOKENS + 1)), budgets=[4]),
        INVALID,
    ),
    "too_many_rows": (
        req(
            activations=wire(np.zeros((MAX_TOKENS + 1, 64), np.float32)), budgets=[4]
        ),
        INVALID,
    ),
    "bad_output_dtype": (
        req(activations=wire(GOOD), budgets=[4], output_dtype=pb.DTYPE_INT32),
        INVALID,
    ),
    "oversize_request": (
        req(activations=wire(np.zeros((1200, 64), np.float32)), budgets=[4]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "oversize_response": (
        req(
            activations=wire(np.ones((MAX_TOKENS, 64), np.float32)),
            budgets=list(range(1, 17)),
            return_reconstructions=True,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "internal_bug": (
        req(activations=wire(np.full((1, 64), BUG_VALUE, np.float32)), budgets=[4]),
        grpc.StatusCode.INTERNAL,
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_each_error_maps_to_its_status_and_server_keeps_serving(server, client, case):
    request, code = ERROR_CASES[case]
    stub = pb_grpc.HSAEStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(request, timeout=30)
    details = info.value.details() or ""
    assert info.value.code() == code, details
    assert details
    if code == grpc.StatusCode.INTERNAL:
        assert "simulated bug" not in details  # internals stay in the server log
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
    running = start_server(sae)
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            assert not c.info().has_lm
            with pytest.raises(ServerError) as info:
                c.encode(text="hello", budgets=[4])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert c.encode(activations=GOOD, budgets=[4]).indices.shape == (2, 4)
    finally:
        running.stop(grace=1)
