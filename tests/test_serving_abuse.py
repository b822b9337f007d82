"""Hostile and careless requests, sent raw through the generated stubs (not the client).

A regression corpus: malformed tensors, absurd shapes, bad budgets and token ids, oversize
requests and responses, results that overflow their dtype, bad Decode codes, missing or wrong
tokens, bad TLS files. Each case asserts the exact gRPC status (or the in-stream error code),
and that the server still answers a good request and a health check afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import (
    GOOD,
    MAX_TOKENS,
    pb,
    pb_grpc,
    req,
    running_server,
    self_signed_tls,
    wire,
)

from hsae_runtime.errors import ConfigError
from hsae_runtime.serving import server as srv
from hsae_runtime.serving.backend import TorchBackend

pytestmark = pytest.mark.timeout(60)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
K_MAX = 16  # the tiny SAE's


def _tensor(data: bytes, shape: list[int], dtype: int = pb.DTYPE_FLOAT32):
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


def _full(value: float, rows: int = 2) -> np.ndarray:
    return np.full((rows, 64), value, np.float32)


@pytest.fixture(scope="module")
def server(sae, lm):
    with running_server(sae, lm) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.HSAEStub(channel)


def _still_serving(channel, stub) -> None:
    reply = stub.Encode(req(activations=wire(GOOD), budgets=[4]), timeout=30)
    assert reply.k == 4
    health: Any = health_pb2_grpc.HealthStub(channel)  # grpc's stubs are untyped
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def _refused(call, request, code: grpc.StatusCode, match: str) -> str:
    """Send ``request`` through ``call``; assert it fails with ``code`` and a message holding
    ``match``; returns that message."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    got, details = info.value.code(), info.value.details() or ""
    assert got == code, details
    assert match in details, details
    return details


# ------------------------------------------------------------------------------- Encode
HUGE_ZERO_SIZE = _tensor(b"", [2**62, 0, 64])

ENCODE_CASES = {
    # malformed tensors
    "dtype_int32": (req(activations=wire(GOOD.view(np.int32), pb.DTYPE_INT32), budgets=[4]),
                    INVALID, "dtype"),
    "dtype_unspecified": (req(activations=_tensor(GOOD.tobytes(), [2, 64], 0), budgets=[4]),
                          INVALID, "dtype"),
    "dtype_unknown": (req(activations=_tensor(GOOD.tobytes(), [2, 64], 99), budgets=[4]),
                      INVALID, "dtype"),
    "no_shape": (req(activations=_tensor(GOOD.tobytes(), []), budgets=[4]), INVALID, "shape"),
    "negative_dim": (req(activations=_tensor(b"", [-2, 64]), budgets=[4]), INVALID, "negative"),
    "byte_length": (req(activations=_tensor(b"\0" * 12, [2, 64]), budgets=[4]), INVALID, "bytes"),
    "wrong_d_in": (req(activations=wire(GOOD[:, :32].copy()), budgets=[4]), INVALID, "d_in"),
    "nan": (req(activations=wire(np.where(GOOD > 1, np.nan, GOOD).astype(np.float32)),
                budgets=[4]), INVALID, "NaN"),
    "inf": (req(activations=wire(_full(np.inf)), budgets=[4]), INVALID, "Inf"),
    "empty": (req(activations=wire(np.zeros((0, 64), np.float32)), budgets=[4]), INVALID,
              "empty"),
    "huge_zero_size": (req(activations=HUGE_ZERO_SIZE, budgets=[4]), INVALID, "too large"),
    "overflowing_shape": (req(activations=_tensor(b"", [2**40, 2**40, 0]), budgets=[4]),
                          INVALID, "too large"),
    "rank_9": (req(activations=_tensor(GOOD.tobytes(), [1] * 7 + [2, 64]), budgets=[4]),
               INVALID, "dimensions"),
    # budgets
    "budget_zero": (req(activations=wire(GOOD), budgets=[0]), INVALID, "k_max=16"),
    "budget_negative": (req(activations=wire(GOOD), budgets=[-1]), INVALID, "k_max=16"),
    "budget_over_k_max": (req(activations=wire(GOOD), budgets=[K_MAX + 1]), INVALID, "k_max=16"),
    "no_budgets": (req(activations=wire(GOOD)), INVALID, "empty"),
    "too_many_budgets": (req(activations=wire(GOOD), budgets=[1] * 100_000), INVALID,
                         "more than the SAE's k_max=16"),
    # token ids
    "token_negative": (req(tokens=pb.TokenIds(ids=[5, -1]), budgets=[4]), INVALID, "out of range"),
    "token_past_vocab": (req(tokens=pb.TokenIds(ids=[5, 10**6]), budgets=[4]), INVALID,
                         "out of range"),
    "tokens_empty": (req(tokens=pb.TokenIds(ids=[]), budgets=[4]), INVALID, "empty"),
    "too_many_tokens": (req(tokens=pb.TokenIds(ids=[5] * (MAX_TOKENS + 1)), budgets=[4]),
                        INVALID, "max_request_tokens"),
    # sizes
    "oversize_request": (req(activations=wire(np.zeros((1200, 64), np.float32)), budgets=[4]),
                         EXHAUSTED, ""),
    "oversize_response": (req(activations=wire(np.ones((MAX_TOKENS, 64), np.float32)),
                              budgets=list(range(1, 17)), return_reconstructions=True),
                          EXHAUSTED, "message limit"),
    # finite input, result not finite in its dtype
    "overflow_float32": (req(activations=wire(_full(3e38)), budgets=[4]), INVALID, "not finite"),
    "overflow_reconstruction": (req(activations=wire(_full(3e38)), budgets=[4],
                                    return_reconstructions=True), INVALID, "not finite"),
    "overflow_float16_output": (req(activations=wire(_full(1e5)), budgets=[4],
                                    output_dtype=pb.DTYPE_FLOAT16), INVALID, "float16"),
    "overflow_fvu": (req(activations=wire(_full(1e20)), budgets=[4], return_fvu=True), INVALID,
                     "FVU"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ENCODE_CASES))
def test_encode_abuse(channel, stub, case):
    request, code, match = ENCODE_CASES[case]
    details = _refused(stub.Encode, request, code, match)
    if code == INVALID:
        assert "hint:" in details or case in _NO_HINT, details
    _still_serving(channel, stub)


# one-line errors whose message is the whole story
_NO_HINT = {"dtype_int32", "dtype_unspecified", "dtype_unknown", "no_shape", "negative_dim",
            "byte_length", "nan", "inf", "empty", "tokens_empty", "token_negative",
            "token_past_vocab"}  # fmt: skip


def test_large_finite_activations_still_encode_when_representable(stub):
    """1e5 activations are refused only as float16 output: float32 output is finite."""
    reply = stub.Encode(req(activations=wire(_full(1e5)), budgets=[4]), timeout=30)
    values = np.frombuffer(reply.values.data, np.float32)
    assert np.isfinite(values).all() and (values >= 0).all()


# ------------------------------------------------------------------------------- EncodeStream
def test_stream_answers_abuse_in_band_and_goes_on(channel, stub):
    items = [
        req(activations=HUGE_ZERO_SIZE, budgets=[4], request_id="huge"),
        req(activations=wire(_full(3e38)), budgets=[4], request_id="overflow"),
        req(activations=wire(_full(1e5)), budgets=[4], output_dtype=pb.DTYPE_FLOAT16,
            request_id="half"),
        req(activations=wire(GOOD), budgets=[1] * 100, request_id="budgets"),
        req(activations=wire(GOOD), budgets=[4], request_id="good"),
    ]  # fmt: skip
    replies = list(stub.EncodeStream(iter(items), timeout=30))
    assert [r.request_id for r in replies] == ["huge", "overflow", "half", "budgets", "good"]
    for reply in replies[:-1]:
        assert reply.error.code == INVALID.value[0], (reply.request_id, reply.error.message)
        assert not reply.values.data
    assert "too large" in replies[0].error.message
    assert "float16" in replies[2].error.message
    assert not replies[-1].HasField("error") and replies[-1].k == 4
    _still_serving(channel, stub)


# ------------------------------------------------------------------------------- Decode
def _code(k: int, rows: int = 1, value: float = 1.0):
    indices = np.tile(np.arange(k, dtype=np.int32) % 256, (rows, 1))
    return wire(indices, pb.DTYPE_INT32), wire(np.full((rows, k), value, np.float32))


def _decode(k: int, budgets=(), value: float = 1.0, **kw):
    indices, values = _code(k, value=value)
    return pb.DecodeRequest(indices=indices, values=values, budgets=list(budgets), **kw)


DECODE_CASES = {
    "k_over_k_max": (_decode(K_MAX + 1), INVALID, "k=17 entries per row, more than the SAE's "
                     "k_max=16"),
    "budget_past_width": (_decode(2, budgets=[3]), INVALID,
                          "out of range 1..k=2, the code's width"),
    "too_many_budgets": (_decode(4, budgets=[1] * 100_000), INVALID, "more than the SAE's k_max"),
    "budget_zero": (_decode(4, budgets=[0]), INVALID, "1..k=4"),
    "huge_zero_size": (pb.DecodeRequest(indices=_tensor(b"", [2**62, 0, 64], pb.DTYPE_INT32),
                                        values=HUGE_ZERO_SIZE), INVALID, "too large"),
    "index_past_d_sae": (pb.DecodeRequest(indices=wire(np.array([[1, 300]], np.int32),
                                                       pb.DTYPE_INT32),
                                          values=wire(np.ones((1, 2), np.float32))),
                         INVALID, "d_sae"),
    "shape_mismatch": (pb.DecodeRequest(indices=_code(3)[0], values=_code(2)[1]), INVALID,
                       "one shape"),
    "values_nan": (_decode(2, value=float("nan")), INVALID, "NaN"),
    "overflow": (_decode(K_MAX, value=3e38), INVALID, "not finite"),
    "overflow_float16": (_decode(K_MAX, value=6e4, output_dtype=pb.DTYPE_FLOAT16), INVALID,
                         "float16"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_abuse(channel, stub, case):
    _refused(stub.Decode, *DECODE_CASES[case])
    _still_serving(channel, stub)


# ------------------------------------------------------------------------------- auth
def test_wrong_or_missing_token_is_unauthenticated_everywhere(sae):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    running = srv.start(TorchBackend(sae), options=srv.ServerOptions(port=0, token="s3cret"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.HSAEStub(ch)
            good = req(activations=wire(GOOD), budgets=[4])
            decode = _decode(4)
            refl: Any = reflection_pb2_grpc.ServerReflectionStub(ch)
            list_services = reflection_pb2.ServerReflectionRequest(list_services="")
            for metadata in ((), (("authorization", "Bearer wrong"),),
                             (("authorization", "s3cret"),), (("authorization", ""),)):  # fmt: skip
                calls = (
                    lambda md: stub.Info(pb.InfoRequest(), timeout=10, metadata=md),
                    lambda md: stub.Encode(good, timeout=10, metadata=md),
                    lambda md: stub.Decode(decode, timeout=10, metadata=md),
                    lambda md: list(stub.EncodeStream(iter([good]), timeout=10, metadata=md)),
                    lambda md: list(refl.ServerReflectionInfo(iter([list_services]), metadata=md)),
                )
                for call in calls:
                    with pytest.raises(grpc.RpcError) as info:
                        call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            authed = (("authorization", "Bearer s3cret"),)
            assert stub.Encode(good, timeout=10, metadata=authed).k == 4
            replies = list(refl.ServerReflectionInfo(iter([list_services]), metadata=authed))
            names = {s.name for s in replies[0].list_services_response.service}
            assert "hsae.v1.HSAE" in names
            health: Any = health_pb2_grpc.HealthStub(ch)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        running.stop(grace=1)


# ------------------------------------------------------------------------------- TLS files
@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


def test_bad_tls_files_name_the_file_not_the_port(sae, tls_pair, tmp_path):
    cert, key = tls_pair
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00 not a pem at all")
    missing = tmp_path / "missing.pem"
    cases = [(missing, key, missing), (garbage, key, garbage), (cert, missing, missing),
             (cert, garbage, garbage), (key, key, key), (cert, cert, cert)]  # fmt: skip
    backend = TorchBackend(sae)
    for tls_cert, tls_key, named in cases:
        options = srv.ServerOptions(port=0, tls_cert=tls_cert, tls_key=tls_key)
        with pytest.raises(ConfigError) as info:
            srv.start(backend, options=options).stop(grace=0)
        message = str(info.value)
        assert str(named) in message and "PEM" in message, message
        assert "port" not in message, message
    running = srv.start(backend, options=srv.ServerOptions(port=0, tls_cert=cert, tls_key=key))
    try:  # a real bind failure keeps the port hint
        with pytest.raises(ConfigError, match="port already in use"):
            srv.start(backend, options=srv.ServerOptions(port=running.port)).stop(grace=0)
    finally:
        running.stop(grace=1)
