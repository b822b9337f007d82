"""``POST /v1/encode/raw``: raw activation bytes in, the code out (JSON or raw bytes).

Oracle: the gRPC ``Encode`` of the same rows on the same server. Then the checks every route
has: bad shape / dtype / length -> 400, no token -> 401, a body over the message size -> 413,
a full queue -> 429, draining -> 503; and the route in the OpenAPI document.
"""

from __future__ import annotations

import threading

import grpc
import httpx
import numpy as np
import pytest

from hsae_runtime.serving import server as srv
from hsae_runtime.serving.http import openapi_document
from hsae_runtime.serving.http_raw import ROUTE, SHAPE_HEADER, VALUES_DTYPE_HEADER
from hsae_runtime.serving.limits import BatcherConfig, ServingLimits
from tests.serving_helpers import MAX_MESSAGE, DelayedBackend, pb, pb_grpc

TOKEN = "s3cret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
D_IN = 64
X = np.random.default_rng(3).standard_normal((5, D_IN)).astype(np.float32)


def start(sae, delay: float = 0.0, **batching) -> srv.RunningServer:
    options = srv.ServerOptions(
        port=0,
        http_port=0,
        token=TOKEN,
        limits=ServingLimits(max_message_bytes=MAX_MESSAGE),
        batching=BatcherConfig(**{"max_wait_ms": 2.0, **batching}),
    )
    return srv.start(DelayedBackend(sae, delay), options=options)


@pytest.fixture(scope="module")
def running(sae):
    server = start(sae)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def http(running):
    with httpx.Client(base_url=f"http://127.0.0.1:{running.http.port}", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(running):
    channel = grpc.insecure_channel(running.address)
    yield pb_grpc.HSAEStub(channel)
    channel.close()


def grpc_encode(stub, x: np.ndarray, dtype: int = pb.DTYPE_FLOAT32, **fields):
    wire = pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=dtype)
    return stub.Encode(pb.EncodeRequest(activations=wire, **fields), metadata=AUTH)


def pb_array(t) -> np.ndarray:
    kinds = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16, pb.DTYPE_INT32: np.int32}
    return np.frombuffer(t.data, kinds[t.dtype]).reshape(list(t.shape))


def b64_array(t: dict) -> np.ndarray:
    import base64

    kinds = {"DTYPE_FLOAT32": np.float32, "DTYPE_FLOAT16": np.float16, "DTYPE_INT32": np.int32}
    return np.frombuffer(base64.b64decode(t["data"]), kinds[t["dtype"]]).reshape(t["shape"])


def post(http, body: bytes, params: dict, headers: dict | None = None) -> httpx.Response:
    return http.post(ROUTE, content=body, params=params, headers=headers or HEADERS)


def test_raw_body_json_answer_matches_grpc(http, stub):
    params = {"shape": [5, D_IN], "budgets": [2, 8], "return_reconstructions": "true",
              "return_fvu": "true", "request_id": "r1"}  # fmt: skip
    got = post(http, X.tobytes(), params)
    assert got.status_code == 200, got.text
    got = got.json()
    want = grpc_encode(stub, X, budgets=[2, 8], return_reconstructions=True, return_fvu=True)
    assert got["k"] == 8 and got["request_id"] == "r1"
    np.testing.assert_array_equal(b64_array(got["indices"]), pb_array(want.indices))
    np.testing.assert_array_equal(b64_array(got["values"]), pb_array(want.values))
    for g, w in zip(got["budgets"], want.budgets, strict=True):
        assert g["budget"] == w.budget
        np.testing.assert_array_equal(b64_array(g["reconstruction"]), pb_array(w.reconstruction))
        np.testing.assert_array_equal(b64_array(g["fvu"]), pb_array(w.fvu))


@pytest.mark.parametrize(
    ("dtype", "wire", "output"),
    [
        (np.float32, pb.DTYPE_FLOAT32, "DTYPE_UNSPECIFIED"),
        (np.float16, pb.DTYPE_FLOAT16, "DTYPE_FLOAT16"),
    ],
)
def test_raw_body_raw_answer_matches_grpc(http, stub, dtype, wire, output):
    x = X.astype(dtype)
    params = {"shape": [5, D_IN], "dtype": pb.DType.Name(wire), "budgets": [4],
              "output_dtype": output}  # fmt: skip
    got = post(http, x.tobytes(), params, {**HEADERS, "Accept": "application/octet-stream"})
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/octet-stream"
    n, k = (int(d) for d in got.headers[SHAPE_HEADER].split(","))
    assert (n, k) == (5, 4)
    values_type = {"DTYPE_FLOAT32": np.float32, "DTYPE_FLOAT16": np.float16}[
        got.headers[VALUES_DTYPE_HEADER]
    ]
    split = n * k * np.dtype(values_type).itemsize
    assert len(got.content) == split + n * k * 4
    values = np.frombuffer(got.content[:split], values_type).reshape(n, k)
    indices = np.frombuffer(got.content[split:], np.int32).reshape(n, k)
    want = grpc_encode(stub, x, wire, budgets=[4], output_dtype=pb.DType.Value(output))
    np.testing.assert_array_equal(indices, pb_array(want.indices))
    np.testing.assert_array_equal(values, pb_array(want.values))


@pytest.mark.parametrize(
    ("body", "params", "headers", "match"),
    [
        (X.tobytes()[:-4], {"shape": [5, D_IN]}, {}, "bytes"),
        (X.tobytes(), {"shape": [5, 32, 2]}, {}, "d_in"),
        (X.tobytes(), {"shape": [10, D_IN]}, {}, "bytes"),
        (X.tobytes(), {}, {}, "shape"),
        (X.tobytes(), {"shape": [5, D_IN], "dtype": "DTYPE_INT32"}, {}, "dtype"),
        (X.tobytes(), {"shape": [5, D_IN], "dtype": "float64"}, {}, "dtype"),
        (X.tobytes(), {"shape": [5, D_IN], "budgets": [99]}, {}, "k_max"),
        (np.full((5, D_IN), np.nan, np.float32).tobytes(), {"shape": [5, D_IN]}, {}, "NaN"),
        (X.tobytes(), {"shape": [5, D_IN]}, {"Content-Type": "application/json"}, "octet"),
        (X.tobytes(), {"shape": [5, D_IN], "return_fvu": "true"},
         {"Accept": "application/octet-stream"}, "code only"),
    ],
    ids=["short-body", "wrong-d_in", "shape-over-body", "no-shape", "int-dtype", "bad-dtype",
         "budget", "nan", "json-content-type", "raw-answer-with-fvu"],
)  # fmt: skip
def test_bad_raw_requests_are_400_and_the_server_keeps_serving(http, body, params, headers, match):
    got = post(http, body, {"budgets": [4], **params}, {**HEADERS, **headers})
    assert got.status_code == 400, got.text
    assert got.json()["code"] == "INVALID_ARGUMENT" and match in got.json()["message"]
    assert post(http, X.tobytes(), {"shape": [5, D_IN], "budgets": [4]}).status_code == 200


def test_raw_route_needs_the_token_and_keeps_the_size_limit(http):
    no_token = {"Content-Type": "application/octet-stream"}
    got = post(http, X.tobytes(), {"shape": [5, D_IN], "budgets": [4]}, no_token)
    assert got.status_code == 401 and got.json()["code"] == "UNAUTHENTICATED"
    wrong = {**no_token, "Authorization": "Bearer nope"}
    assert post(http, X.tobytes(), {"shape": [5, D_IN]}, wrong).status_code == 401
    rows = MAX_MESSAGE // (D_IN * 4) + 1
    big = np.zeros((rows, D_IN), np.float32)
    got = post(http, big.tobytes(), {"shape": [rows, D_IN]})
    assert got.status_code == 413 and got.json()["code"] == "RESOURCE_EXHAUSTED"
    # A chunked body (no Content-Length) is counted as it arrives.
    params = {"shape": [rows, D_IN]}
    chunked = http.post(ROUTE, content=iter([big.tobytes()]), params=params, headers=HEADERS)
    assert chunked.status_code == 413 and "message limit" in chunked.json()["message"]


def test_full_queue_is_429_and_draining_is_503(sae):
    server = start(sae, delay=0.3, max_queue=1, batching=False)
    statuses: list[int] = []
    lock = threading.Lock()
    url = f"http://127.0.0.1:{server.http.port}"

    def call() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            status = post(client, X.tobytes(), {"shape": [5, D_IN], "budgets": [4]}).status_code
        with lock:
            statuses.append(status)

    try:
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses
        server.servicer.gate.drain()
        with httpx.Client(base_url=url, timeout=30) as client:
            got = post(client, X.tobytes(), {"shape": [5, D_IN], "budgets": [4]})
        assert got.status_code == 503 and got.json()["code"] == "UNAVAILABLE"
    finally:
        server.stop(grace=0)


def test_openapi_documents_the_raw_body_and_answer():
    op = openapi_document()["paths"][ROUTE]["post"]
    assert "application/octet-stream" in op["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(
        op["responses"]["200"]["content"]
    )
    names = {p["name"] for p in op["parameters"]}
    assert {"shape", "dtype", "budgets", "return_reconstructions", "output_dtype"} <= names
    assert {"400", "401"} <= set(op["responses"])
