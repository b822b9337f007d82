"""The HTTP/JSON API, Generate and metrics of a running server (tiny Gemma-2 + tiny SAE).

One server per module with ``--http-port 0 --metrics-port 0`` and a token: every HTTP route is
checked against the gRPC answer for the same input, then auth, limits, errors, metrics, a
cancelled generation and the features folder. The contract checks that need no shared server
(the error table, the OpenAPI document, readiness while draining) are in
test_serving_http_contract.py.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hsae_runtime.generation import GenerationBatch, GenerationRequest
from hsae_runtime.serving import server as srv
from hsae_runtime.serving.limits import BatcherConfig, ServingLimits
from hsae_runtime.steering import Intervention, SteerSpec
from tests.serving_helpers import HOOKPOINT, MAX_MESSAGE, MAX_TOKENS, DelayedBackend, pb, pb_grpc

TOKEN = "s3cret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    (folder / "index.html").write_text("<h1>latents</h1>")
    return folder


@pytest.fixture(scope="module")
def running(sae, lm, features_dir):
    from hsae_runtime.lm import capture

    options = srv.ServerOptions(
        port=0,
        http_port=0,
        metrics_port=0,
        token=TOKEN,
        features_dir=features_dir,
        limits=ServingLimits(
            max_request_tokens=MAX_TOKENS, max_message_bytes=MAX_MESSAGE, max_generations=2
        ),
        batching=BatcherConfig(max_wait_ms=2.0),
    )
    server = srv.start(
        DelayedBackend(sae), lm=lm, hookpoint=HOOKPOINT, options=options,
        capture=lambda ids, mask, cache=None: capture(lm, HOOKPOINT, ids, mask, cache=cache),
    )  # fmt: skip
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def stub(running):
    channel = grpc.insecure_channel(running.address)
    yield pb_grpc.HSAEStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def http(running):
    with httpx.Client(base_url=f"http://127.0.0.1:{running.http.port}", timeout=60) as client:
        yield client


def array(t: dict) -> np.ndarray:
    """A response TensorJSON as numpy (either form)."""
    kinds = {"DTYPE_FLOAT32": np.float32, "DTYPE_FLOAT16": np.float16, "DTYPE_INT32": np.int32}
    if "data" in t and t["data"] is not None:
        flat = np.frombuffer(base64.b64decode(t["data"]), kinds[t["dtype"]])
    else:
        flat = np.asarray(t["array"], kinds[t["dtype"]])
    return flat.reshape(t["shape"])


def pb_array(t) -> np.ndarray:
    kinds = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16, pb.DTYPE_INT32: np.int32}
    return np.frombuffer(t.data, kinds[t.dtype]).reshape(list(t.shape))


# ----------------------------------------------------------------------------- round trips
def test_info_matches_grpc(http, stub):
    got = http.get("/v1/info", headers=HEADERS).json()
    want = stub.Info(pb.InfoRequest(), metadata=AUTH)
    for name, value in got.items():
        expected = getattr(want, name)
        assert value == (list(expected) if name == "trained_budgets" else expected), name


@pytest.mark.parametrize("binary", [False, True])
def test_encode_text_matches_grpc(http, stub, binary):
    body = {"text": TEXT, "budgets": [2, 8], "return_reconstructions": True, "return_fvu": True,
            "binary": binary}  # fmt: skip
    got = http.post("/v1/encode", json=body, headers=HEADERS)
    assert got.status_code == 200, got.text
    got = got.json()
    want = stub.Encode(
        pb.EncodeRequest(text=TEXT, budgets=[2, 8], return_reconstructions=True, return_fvu=True),
        metadata=AUTH,
    )
    assert got["tokens"] == list(want.tokens) and got["k"] == 8
    assert got["token_ids"] == list(want.token_ids) and got["positions"] == list(want.positions)
    assert ("data" in got["values"]) == binary
    np.testing.assert_array_equal(array(got["indices"]), pb_array(want.indices))
    np.testing.assert_allclose(array(got["values"]), pb_array(want.values), rtol=1e-6)
    for g, w in zip(got["budgets"], want.budgets, strict=True):
        assert g["budget"] == w.budget
        np.testing.assert_allclose(array(g["reconstruction"]), pb_array(w.reconstruction),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(array(g["fvu"]), pb_array(w.fvu), rtol=1e-5, atol=1e-6)


def test_encode_tokens_and_activations_match_grpc(http, stub):
    ids = [2, 10, 11, 12, 13]
    got = http.post("/v1/encode", json={"tokens": {"ids": ids}, "budgets": [4]}, headers=HEADERS)
    want = stub.Encode(pb.EncodeRequest(tokens=pb.TokenIds(ids=ids), budgets=[4]), metadata=AUTH)
    np.testing.assert_array_equal(array(got.json()["indices"]), pb_array(want.indices))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    wire = pb.Tensor(data=x.tobytes(), shape=[3, 64], dtype=pb.DTYPE_FLOAT32)
    want = stub.Encode(pb.EncodeRequest(activations=wire, budgets=[4]), metadata=AUTH)
    as_list = {"shape": [3, 64], "dtype": "DTYPE_FLOAT32", "array": x.ravel().tolist()}
    as_b64 = {"shape": [3, 64], "dtype": "DTYPE_FLOAT32",
              "data": base64.b64encode(x.tobytes()).decode()}  # fmt: skip
    for tensor in (as_list, as_b64):
        body = {"activations": tensor, "budgets": [4]}
        got = http.post("/v1/encode", json=body, headers=HEADERS).json()
        np.testing.assert_array_equal(array(got["indices"]), pb_array(want.indices))
        np.testing.assert_array_equal(array(got["values"]), pb_array(want.values))


def test_decode_matches_grpc(http, stub):
    idx = np.array([[3, 7, 1], [5, -1, 0]], np.int32)
    val = np.array([[2.0, 1.0, 0.5], [1.5, 0.0, 0.25]], np.float32)
    want = stub.Decode(
        pb.DecodeRequest(
            indices=pb.Tensor(data=idx.tobytes(), shape=[2, 3], dtype=pb.DTYPE_INT32),
            values=pb.Tensor(data=val.tobytes(), shape=[2, 3], dtype=pb.DTYPE_FLOAT32),
            budgets=[1, 3],
        ),
        metadata=AUTH,
    )
    body = {
        "indices": {"shape": [2, 3], "dtype": "DTYPE_INT32", "array": idx.ravel().tolist()},
        "values": {"shape": [2, 3], "dtype": "DTYPE_FLOAT32", "array": val.ravel().tolist()},
        "budgets": [1, 3],
    }
    got = http.post("/v1/decode", json=body, headers=HEADERS).json()
    for g, w in zip(got["reconstructions"], want.reconstructions, strict=True):
        assert g["budget"] == w.budget
        np.testing.assert_array_equal(array(g["reconstruction"]), pb_array(w.reconstruction))


GEN = {"text": "The quick brown", "budget": 4, "max_new_tokens": 6, "top_logprobs": 3,
       "interventions": [{"latent": 5, "op": "STEER_OP_SET", "value": 30.0}]}  # fmt: skip


def grpc_generate(stub, **changes):
    fields = {
        "text": GEN["text"], "budget": 4, "max_new_tokens": 6, "top_logprobs": 3,
        "interventions": [pb.Intervention(latent=5, op=pb.STEER_OP_SET, value=30.0)], **changes,
    }  # fmt: skip
    return list(stub.Generate(pb.GenerateRequest(**fields), metadata=AUTH))


def test_generate_rpc_equals_the_library(stub, lm, sae):
    steps = grpc_generate(stub, compare_unsteered=True, return_code=True)
    prompt = lm.tokenizer(GEN["text"])["input_ids"]
    spec = SteerSpec(4, (Intervention(5, "set", 30.0),))
    req = GenerationRequest(prompt, spec, max_new_tokens=6, top_logprobs=3,
                            compare_unsteered=True, return_code=True)  # fmt: skip
    batch = GenerationBatch(lm, sae, HOOKPOINT, [req])
    direct = []
    while not batch.done:
        direct += batch.step()
    assert [s.token_id for s in steps] == [s.token_id for s in direct]
    assert steps[-1].finish_reason == direct[-1].finish_reason != ""
    assert steps[-1].text == lm.tokenizer.decode([s.token_id for s in direct])
    for got, want in zip(steps, direct, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t.token_id for t in got.top] == [t for t, _ in want.top]
        assert got.unsteered_logprob == pytest.approx(want.unsteered_logprob, abs=1e-5)
        assert want.code is not None and 5 in pb_array(got.indices).tolist()
        np.testing.assert_allclose(pb_array(got.values), want.code.values.numpy(), rtol=1e-6)


def test_generate_http_matches_grpc_whole_and_streamed(http, stub):
    want = grpc_generate(stub)
    whole = http.post("/v1/generate", json=GEN, headers=HEADERS)
    assert whole.status_code == 200, whole.text
    assert [s["token_id"] for s in whole.json()["steps"]] == [s.token_id for s in want]
    events = []
    with http.stream("POST", "/v1/generate", json={**GEN, "stream": True}, headers=HEADERS) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["token_id"] for e in events] == [s.token_id for s in want]
    assert events[-1]["text"] == want[-1].text and events[-1]["finish_reason"]
    for e, w in zip(events, want, strict=True):
        assert e["logprob"] == pytest.approx(w.logprob)


# ----------------------------------------------------------------------------- errors, auth
def test_auth_applies_to_http_and_grpc_but_not_probes(http, stub):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = http.post("/v1/encode", json={"text": TEXT, "budgets": [2]}, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHENTICATED"
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200


def test_grpc_generate_without_token_is_refused(running):
    with grpc.insecure_channel(running.address) as channel:
        plain = pb_grpc.HSAEStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(plain.Generate(pb.GenerateRequest(text="x", budget=2)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"interventions": [{"latent": 256, "op": "STEER_OP_SET", "value": 1.0}]}, "latent id"),
        ({"budget": 17}, "k_max=16"),
        ({"max_new_tokens": MAX_TOKENS}, "max_request_tokens"),
    ],
)
def test_bad_generate_is_400_and_invalid_argument_and_the_server_keeps_serving(
    http, stub, changes, match
):
    r = http.post("/v1/generate", json={**GEN, **changes}, headers=HEADERS)
    assert r.status_code == 400 and match in r.json()["message"], r.text
    assert r.json()["code"] == "INVALID_ARGUMENT"
    grpc_changes = dict(changes)
    if "interventions" in grpc_changes:
        grpc_changes["interventions"] = [pb.Intervention(latent=256, op=pb.STEER_OP_SET, value=1)]
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(stub, **grpc_changes)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()
    assert len(grpc_generate(stub)) == 6  # still serving


def test_nan_intervention_value_is_refused(stub):
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(stub, interventions=[pb.Intervention(latent=3, op=pb.STEER_OP_SCALE,
                                                           value=float("nan"))])  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_limits_and_bad_bodies(http):
    big = {"text": "x" * (MAX_MESSAGE + 10), "budgets": [2]}
    r = http.post("/v1/encode", json=big, headers=HEADERS)
    assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
    r = http.post("/v1/encode", json={"tokens": {"ids": [5] * (MAX_TOKENS + 1)}, "budgets": [2]},
                  headers=HEADERS)  # fmt: skip
    assert r.status_code == 400 and "max_request_tokens" in r.json()["message"]
    r = http.post("/v1/encode", json={"text": TEXT, "budgets": [99]}, headers=HEADERS)
    assert r.status_code == 400 and "k_max" in r.json()["message"]
    r = http.post("/v1/encode", json={"text": TEXT, "budgets": "x"}, headers=HEADERS)
    assert r.status_code == 400 and "budgets" in r.json()["message"]
    r = http.post("/v1/encode", json={"budgets": [2]}, headers=HEADERS)
    assert r.status_code == 400 and "exactly one input" in r.json()["message"]
    bad = {"shape": [1, 64], "dtype": "DTYPE_FLOAT32", "data": "!!!"}
    r = http.post("/v1/encode", json={"activations": bad, "budgets": [2]}, headers=HEADERS)
    assert r.status_code == 400 and "base64" in r.json()["message"]


# ----------------------------------------------------------------------------- slots, metrics
def _wait_until(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_cancelled_streams_free_their_slots(running, stub, http):
    scheduler = running.batcher.generation
    long = pb.GenerateRequest(text="The", budget=4, max_new_tokens=MAX_TOKENS - 8)
    calls = [stub.Generate(long, metadata=AUTH) for _ in range(2)]  # max_generations=2
    for call in calls:
        next(call)
    with pytest.raises(grpc.RpcError) as err:  # both slots taken
        grpc_generate(stub)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Encode traffic is not held up by the generations in progress.
    stub.Encode(pb.EncodeRequest(text=TEXT, budgets=[2]), metadata=AUTH, timeout=30)
    assert scheduler.live == 2
    for call in calls:
        call.cancel()
    assert _wait_until(lambda: scheduler.live == 0)
    assert len(grpc_generate(stub)) == 6
    # The same over HTTP: a client that leaves a server-sent event stream frees its slot.
    body = {"text": "The", "budget": 4, "max_new_tokens": MAX_TOKENS - 8, "stream": True}
    with http.stream("POST", "/v1/generate", json=body, headers=HEADERS) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    assert _wait_until(lambda: scheduler.live == 0)


def metric_samples(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_scraped_after_requests(running, http, stub):
    http.post("/v1/encode", json={"text": TEXT, "budgets": [2]}, headers=HEADERS)
    http.post("/v1/encode", json={"text": TEXT, "budgets": [99]}, headers=HEADERS)
    stub.Encode(pb.EncodeRequest(text=TEXT, budgets=[2]), metadata=AUTH)
    grpc_generate(stub)
    got = metric_samples(running.metrics_server.server_port)
    ok = got[("hsae_requests_total", (("route", "POST /v1/encode"), ("status", "200")))]
    assert ok >= 1
    assert got[("hsae_requests_total", (("route", "POST /v1/encode"), ("status", "400")))] >= 1
    assert got[("hsae_requests_total", (("route", "Encode"), ("status", "OK")))] >= 1
    assert got[("hsae_requests_total", (("route", "Generate"), ("status", "OK")))] >= 1
    assert got[("hsae_request_seconds_count", (("route", "Encode"),))] >= 1
    assert got[("hsae_generated_tokens_total", ())] >= 6
    assert got[("hsae_batch_rows_count", ())] >= 2 and got[("hsae_rows_total", ())] >= 2
    assert got[("hsae_lm_tokens_total", ())] > 0
    assert got[("hsae_generation_streams", ())] == 0  # every generation has ended


# ----------------------------------------------------------------------------- docs, features
def test_features_folder_is_served(http):
    r = http.get("/features/index.html")
    assert r.status_code == 200 and "latents" in r.text


def test_cli_generate_prints_the_steered_text(running, stub, tmp_path):
    from typer.testing import CliRunner

    from hsae_runtime.cli import app
    from hsae_runtime.errors import InputError

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    want = grpc_generate(stub, top_logprobs=0)
    args = ["generate", "--server", running.address, "--token-file", str(token_file),
            GEN["text"], "--budget", "4", "--clamp", "5=30", "--max-new-tokens", "6"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(want[-1].text)
    bad = CliRunner().invoke(app, [*args[:-4], "--ablate", "x"])
    assert isinstance(bad.exception, InputError)
    refused = CliRunner().invoke(app, [*args, "--ablate", "999"])
    assert refused.exit_code == 1 and "INVALID_ARGUMENT" in refused.output
