"""The HTTP/JSON contract without the shared server of test_serving_http.py: the one error
table's HTTP statuses, the committed OpenAPI document, ``/readyz`` while draining, and Generate
on a server without an LM (each test that needs a server starts its own, tiny SAE only)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest

from hsae_runtime.serving import server as srv
from hsae_runtime.serving.errors import (
    AuthError,
    CancelledError,
    DeadlineError,
    NotServedError,
    OversizeError,
    QueueFullError,
    ShuttingDownError,
    StreamLimitError,
    http_status_for,
)
from hsae_runtime.serving.http import openapi_document
from tests.serving_helpers import DelayedBackend, pb, pb_grpc

REPO = Path(__file__).resolve().parents[1]


def test_one_error_table_gives_every_http_status():
    assert http_status_for(OversizeError("x"))[:2] == (413, "RESOURCE_EXHAUSTED")
    assert http_status_for(QueueFullError("x"))[:2] == (429, "RESOURCE_EXHAUSTED")
    assert http_status_for(StreamLimitError("x"))[0] == 429
    assert http_status_for(AuthError("x"))[:2] == (401, "UNAUTHENTICATED")
    assert http_status_for(ShuttingDownError("x"))[:2] == (503, "UNAVAILABLE")
    assert http_status_for(NotServedError("x"))[0] == 400
    assert http_status_for(DeadlineError("x"))[0] == 504
    assert http_status_for(CancelledError("x"))[0] == 499
    assert http_status_for(RuntimeError("bug"))[:2] == (500, "INTERNAL")


def test_openapi_document_is_current_and_valid():
    from openapi_spec_validator import validate

    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "docs/openapi.json is stale: run `make openapi`"
    )
    validate(committed)
    assert {"/v1/info", "/v1/encode", "/v1/decode", "/v1/generate", "/healthz", "/readyz"} <= set(
        committed["paths"]
    )


def test_readyz_is_503_while_draining(sae):
    options = srv.ServerOptions(port=0, http_port=0)
    server = srv.start(DelayedBackend(sae), options=options)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http.port}") as client:
            assert client.get("/readyz").status_code == 200
            server.servicer.gate.drain()
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
            r = client.post("/v1/generate", json={"text": "x", "budget": 2})
            assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
    finally:
        server.stop(grace=0)


def test_generate_on_a_no_lm_server_is_refused(sae):
    server = srv.start(DelayedBackend(sae), options=srv.ServerOptions(port=0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.HSAEStub(channel).Generate(pb.GenerateRequest(text="x", budget=2)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop(grace=0)
