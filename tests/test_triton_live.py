"""A real ``tritonserver`` (the ``triton`` extra) serves the exported Python-backend repository.

One server for the module, on loopback with free ports, loading two models exported from one
SAE: ``hsae`` (float32, dynamic batching with a queue delay long enough to batch a burst) and
``hsae_bf16`` (bfloat16 wire dtype, no dynamic batching, the model file referenced by path).
Checked over HTTP and gRPC (``tritonclient``) against the in-process SAE at mixed per-row
budgets; bad requests get errors while the server keeps serving; ``/metrics`` counts requests.
Nothing is installed here: without the extra the module is skipped, saying so.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.exporters.triton_repo import export_triton_python_repo
from hsae_runtime.exporters.triton_server import (
    TritonPorts,
    TritonServer,
    TritonServerError,
    find_dist,
)

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (tritonclient's) not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

try:
    find_dist()
except TritonServerError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"the triton extra (nvidia-pytriton) is not installed: {err}",
                allow_module_level=True)

D_IN, D_SAE, K_MAX = 24, 64, 8
PROTOCOLS = ("http", "grpc")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def sae() -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=K_MAX))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def server(sae, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    source = tmp / "sae.safetensors"
    sae.save(source)
    export_triton_python_repo(sae, tmp / "repo", name="hsae", queue_delay_us=20_000,
                              instance_kind="cpu")
    export_triton_python_repo(sae, tmp / "repo", name="hsae_bf16", dtype="bfloat16",
                              queue_delay_us=None, model_file=source)
    export_triton_python_repo(sae, tmp / "repo", name="hsae_refine", queue_delay_us=None,
                              model_file=source, readout="refine")
    log_file = tmp / "tritonserver.log"
    # a long drain: on a loaded machine unloading the models can take longer than the default
    srv = TritonServer(tmp / "repo", ports=TritonPorts(*free_ports(3)), log_file=log_file,
                       exit_timeout_s=60)
    srv.start()
    try:
        srv.wait_ready(180)
    except TritonServerError:
        srv.stop()
        pytest.fail("tritonserver did not start:\n" + log_file.read_text()[-4000:])
    yield srv
    assert srv.stop() == 0, log_file.read_text()[-4000:]


def client(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(server.http_url)
    return grpcclient, grpcclient.InferenceServerClient(server.grpc_url)


def infer(server, protocol, x, k, budgets=None, model="hsae", outputs=None, wire="FP32"):
    mod, c = client(server, protocol)
    try:
        inputs = [mod.InferInput("x", list(x.shape), wire), mod.InferInput("k", list(k.shape),
                                                                           "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(k)
        if budgets is not None:
            inputs.append(mod.InferInput("budgets", list(budgets.shape), "INT64"))
            inputs[2].set_data_from_numpy(budgets)
        asked = [mod.InferRequestedOutput(name) for name in outputs] if outputs else None
        result = c.infer(model, inputs, outputs=asked)
        names = outputs or ["values", "indices", "reconstruction"] + (
            ["reconstructions"] if budgets is not None else [])
        return {name: result.as_numpy(name) for name in names}
    finally:
        c.close()


def metric(server: TritonServer, name: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://{server.host}:{server.ports.metrics}/metrics").read()
    pattern = rf'^{name}{{model="{model}",version="1"}} (\S+)$'
    match = re.search(pattern, text.decode(), re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


def expected(sae: SAE, x: np.ndarray, k: np.ndarray, budgets: np.ndarray):
    xt = torch.from_numpy(x.astype(np.float32))
    code = sae.encode(xt, torch.from_numpy(k).reshape(-1))  # [n, max(k)], tails masked
    pad = K_MAX - code.values.shape[1]
    recons = torch.stack([sae.reconstruct(xt[i:i + 1], budgets[i].tolist())[:, 0]
                          for i in range(len(x))])  # (n, n_budgets, d_in)
    return {
        "values": torch.nn.functional.pad(code.values, (0, pad)).numpy(),
        "indices": torch.nn.functional.pad(code.indices, (0, pad), value=-1).numpy(),
        "reconstruction": sae.decode(code).numpy(),
        "reconstructions": recons.numpy(),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_codes_and_reconstructions_equal_the_sae(server, sae, protocol):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, D_IN), dtype=np.float32)
    k = np.array([[1], [3], [8], [5], [2]], dtype=np.int64)
    budgets = np.array([[2, 8], [1, 4], [8, 8], [3, 6], [5, 1]], dtype=np.int64)
    got = infer(server, protocol, x, k, budgets)
    want = expected(sae, x, k, budgets)
    assert np.array_equal(got["indices"], want["indices"])
    for name in ("values", "reconstruction", "reconstructions"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_refine_readout_model_serves_refined_codes(server, sae):
    x = np.random.default_rng(3).standard_normal((4, D_IN), dtype=np.float32)
    k = np.array([[8], [3], [6], [8]], dtype=np.int64)
    got = infer(server, "http", x, k, model="hsae_refine", outputs=["values", "indices"])
    refined = SAE(sae.config)
    refined.load_state_dict(sae.state_dict())
    want = expected(refined.requires_grad_(False).set_readout("refine"), x, k, k)
    plain = expected(sae, x, k, k)
    assert np.array_equal(got["indices"], want["indices"])
    np.testing.assert_allclose(got["values"], want["values"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got["values"], plain["values"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bfloat16_wire_dtype(server, sae, protocol):
    x = np.random.default_rng(2).standard_normal((3, D_IN)).astype(ml_dtypes.bfloat16)
    k = np.array([[8], [4], [1]], dtype=np.int64)
    got = infer(server, protocol, x, k, model="hsae_bf16", outputs=["values", "indices"],
                wire="BF16")
    assert got["values"].dtype == ml_dtypes.bfloat16
    want = expected(sae, x, k, np.ones((3, 1), dtype=np.int64))
    assert np.array_equal(got["indices"], want["indices"])
    np.testing.assert_allclose(got["values"].astype(np.float32), want["values"], rtol=1e-2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_errors_and_the_server_keeps_serving(server, sae, protocol):
    good_x = np.ones((1, D_IN), dtype=np.float32)
    good_k = np.array([[4]], dtype=np.int64)
    nan_x = good_x.copy()
    nan_x[0, 3] = np.nan
    cases = {
        "budget k=0 is out of range": (good_x, np.array([[0]], dtype=np.int64), None),
        f"out of range 1..k_max={K_MAX}": (good_x, np.array([[K_MAX + 1]], dtype=np.int64),
                                           None),
        "NaN": (nan_x, good_k, None),
        "unexpected shape for input 'x'": (np.ones((1, D_IN - 1), dtype=np.float32), good_k,
                                           None),
        "budgets must have 1..8 columns": (good_x, good_k, np.ones((1, 9), dtype=np.int64)),
    }
    before = metric(server, "nv_inference_request_success", "hsae")
    for message, (x, k, budgets) in cases.items():
        with pytest.raises(InferenceServerException, match=re.escape(message)) as info:
            infer(server, protocol, x, k, budgets)
        want_status = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
        assert info.value.status() == want_status, (message, info.value.status())
        got = infer(server, protocol, good_x, good_k)  # still serving
        assert np.array_equal(got["indices"], expected(sae, good_x, good_k, good_k)["indices"])
    # Every request that reached the model counts as completed (a backend error response is a
    # completed request to Triton); the one with the wrong width is refused before the model.
    after = metric(server, "nv_inference_request_success", "hsae")
    assert after - before == 2 * len(cases) - 1


def test_a_burst_of_single_rows_is_batched_and_counted(server, sae):
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((16, 1, D_IN), dtype=np.float32)
    ks = rng.integers(1, K_MAX + 1, size=(16, 1, 1))
    requests_before = metric(server, "nv_inference_request_success", "hsae")
    batches_before = metric(server, "nv_inference_exec_count", "hsae")
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(infer, server, "grpc", x, k, outputs=["values", "indices"])
                   for x, k in zip(xs, ks)]
        results = [f.result() for f in futures]
    for x, k, got in zip(xs, ks, results):
        assert np.array_equal(got["indices"], expected(sae, x, k, k)["indices"])
    assert metric(server, "nv_inference_request_success", "hsae") - requests_before == 16
    batches = metric(server, "nv_inference_exec_count", "hsae") - batches_before
    assert 1 <= batches < 16, f"16 concurrent requests ran in {batches:.0f} batches"


def test_a_model_that_fails_to_load_is_a_clear_error(sae, tmp_path):
    export_triton_python_repo(sae, tmp_path / "repo", name="broken")
    (tmp_path / "repo/broken/1/model.safetensors").write_bytes(b"not a model")
    log_file = tmp_path / "tritonserver.log"
    srv = TritonServer(tmp_path / "repo", ports=TritonPorts(*free_ports(3)), log_file=log_file)
    srv.start()
    try:
        with pytest.raises(TritonServerError, match="exited with code"):
            srv.wait_ready(180)
    finally:
        srv.stop()
    assert "broken" in log_file.read_text()
