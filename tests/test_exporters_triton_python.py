"""Triton Python-backend repository: the config, the batch logic model.py runs, the CLI flags.

The live server test (a real ``tritonserver`` loading this repository) is test_triton_live.py.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.errors import ConfigError, HSAEError, InputError
from hsae_runtime.exporters.triton_batch import MAX_BUDGETS, BatchRequest, run_batch
from hsae_runtime.exporters.triton_repo import export_triton_python_repo, python_config_pbtxt

D_IN, D_SAE, K_MAX = 24, 64, 8


@pytest.fixture
def sae() -> SAE:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=K_MAX))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae.requires_grad_(False)


def parse(text: str):
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient absent")
    from google.protobuf import text_format

    return text_format.Parse(text, mc.ModelConfig())


def mc_type(name: str) -> int:
    import tritonclient.grpc.model_config_pb2 as mc

    return mc.DataType.Value(name)


def test_config_parses_as_triton_model_config():
    cfg = parse(python_config_pbtxt("m", d_in=D_IN, k_max=K_MAX, dtype="bfloat16",
                                    max_batch_size=32, queue_delay_us=250, instance_kind="cpu",
                                    instance_count=3, model_file="/abs/m.safetensors"))
    assert cfg.backend == "python" and cfg.max_batch_size == 32
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg.instance_group[0].count == 3
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    inputs = {i.name: i for i in cfg.input}
    assert list(inputs["x"].dims) == [D_IN] and inputs["x"].data_type == mc_type("TYPE_BF16")
    assert list(inputs["k"].dims) == [1] and inputs["budgets"].optional
    outputs = {o.name: list(o.dims) for o in cfg.output}
    assert outputs == {"values": [K_MAX], "indices": [K_MAX], "reconstruction": [D_IN],
                       "reconstructions": [-1, D_IN]}
    assert cfg.parameters["model_file"].string_value == "/abs/m.safetensors"
    off = parse(python_config_pbtxt("m", d_in=D_IN, k_max=K_MAX, queue_delay_us=None))
    assert not off.HasField("dynamic_batching") and not off.instance_group


@pytest.mark.parametrize("kwargs", [dict(dtype="int8"), dict(instance_count=0),
                                    dict(max_batch_size=0), dict(queue_delay_us=-1)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        python_config_pbtxt("m", d_in=4, k_max=2, **kwargs)


def test_batch_matches_the_sae_at_mixed_budgets(sae):
    xs = [torch.randn(n, D_IN) for n in (1, 3, 2)]
    ks = [torch.tensor([[8]]), torch.tensor([[1], [5], [8]]), torch.tensor([[2], [3]])]
    budgets = [None, torch.tensor([[2, 8]] * 3), torch.tensor([[1, 4, 8], [8, 2, 3]])]
    reqs = [BatchRequest(x, k, b) for x, k, b in zip(xs, ks, budgets)]
    results = run_batch(sae, reqs)
    for req, out in zip(reqs, results):
        assert isinstance(out, dict)
        k = req.k.reshape(-1)
        code = sae.encode(req.x, k)  # [n, max(k)], tail masked
        pad = K_MAX - code.values.shape[1]
        torch.testing.assert_close(out["values"], torch.nn.functional.pad(code.values, (0, pad)))
        assert torch.equal(out["indices"],
                           torch.nn.functional.pad(code.indices, (0, pad), value=-1))
        torch.testing.assert_close(out["reconstruction"], sae.decode(code))
        if req.budgets is None:
            assert "reconstructions" not in out
            continue
        for row in range(req.x.shape[0]):
            want = sae.reconstruct(req.x[row:row + 1], req.budgets[row].tolist())[:, 0]
            torch.testing.assert_close(out["reconstructions"][row], want)


def test_only_asked_outputs_in_the_wire_dtype(sae):
    x = torch.randn(2, D_IN, dtype=torch.bfloat16)
    req = BatchRequest(x, torch.tensor([[4], [6]]), outputs=frozenset({"values"}))
    (out,) = run_batch(sae, [req])
    assert isinstance(out, dict) and set(out) == {"values"}
    assert out["values"].dtype == torch.bfloat16 and out["values"].shape == (2, K_MAX)


def test_a_bad_request_fails_alone(sae):
    good = BatchRequest(torch.randn(2, D_IN), torch.tensor([[3], [8]]))
    nan = torch.randn(1, D_IN)
    nan[0, 0] = float("nan")
    bad = {
        "k=0": BatchRequest(torch.randn(1, D_IN), torch.tensor([[0]])),
        "k>k_max": BatchRequest(torch.randn(1, D_IN), torch.tensor([[K_MAX + 1]])),
        "float k": BatchRequest(torch.randn(1, D_IN), torch.tensor([[2.0]])),
        "width": BatchRequest(torch.randn(1, D_IN - 1), torch.tensor([[2]])),
        "nan": BatchRequest(nan, torch.tensor([[2]])),
        "budget": BatchRequest(torch.randn(1, D_IN), torch.tensor([[2]]), torch.tensor([[0]])),
        "many budgets": BatchRequest(torch.randn(1, D_IN), torch.tensor([[2]]),
                                     torch.ones(1, MAX_BUDGETS + 1, dtype=torch.int64)),
        "output": BatchRequest(torch.randn(1, D_IN), torch.tensor([[2]]),
                               outputs=frozenset({"dense"})),
    }
    results = run_batch(sae, [good, *bad.values(), good])
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    torch.testing.assert_close(results[0]["values"], results[-1]["values"])
    for name, res in zip(bad, results[1:-1]):
        assert isinstance(res, InputError), name
    assert "NaN" in str(results[5]) and "out of range" in str(results[1])


def test_repository_files_copy_and_reference(sae, tmp_path):
    cfg_path, files = export_triton_python_repo(sae, tmp_path / "repo", name="sae")
    names = sorted(p.relative_to(tmp_path / "repo").as_posix() for p in files)
    assert names == ["sae/1/model.py", "sae/1/model.safetensors", "sae/config.pbtxt"]
    assert SAE.load(tmp_path / "repo/sae/1/model.safetensors").config == sae.config
    assert "class TritonPythonModel" in (tmp_path / "repo/sae/1/model.py").read_text()
    source = tmp_path / "m.safetensors"
    sae.save(source)
    cfg_path, files = export_triton_python_repo(sae, tmp_path / "r2", model_file=source)
    assert not (tmp_path / "r2/hsae/1/model.safetensors").exists()
    assert parse(cfg_path.read_text()).parameters["model_file"].string_value == str(source)
    other = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=4))
    with pytest.raises(ConfigError):
        export_triton_python_repo(other, tmp_path / "r3", model_file=source)


def test_cli_python_backend_and_flag_errors(sae, tmp_path):
    from hsae_runtime.cli import app

    runner = CliRunner()
    source = tmp_path / "m.safetensors"
    sae.save(source)
    res = runner.invoke(app, ["export", str(source), "--triton-repo", str(tmp_path / "repo"),
                              "--dtype", "bfloat16", "--no-dynamic-batching",
                              "--triton-instance", "cpu", "--triton-instances", "2",
                              "--triton-reference-model"])
    assert res.exit_code == 0, res.output
    cfg = parse((tmp_path / "repo/hsae/config.pbtxt").read_text())
    assert cfg.backend == "python" and not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["model_file"].string_value == str(source.resolve())
    res = runner.invoke(app, ["export", str(source), "--triton-repo", str(tmp_path / "ref"),
                              "--readout", "refine"])
    assert res.exit_code == 0, res.output
    cfg = parse((tmp_path / "ref/hsae/config.pbtxt").read_text())
    assert cfg.parameters["readout"].string_value == "refine"
    assert "readout" not in parse((tmp_path / "repo/hsae/config.pbtxt").read_text()).parameters
    for extra in (["--triton-backend", "tensorrt"],
                  ["--triton-backend", "onnx", "--dtype", "bfloat16"],
                  ["--triton-backend", "onnx", "--triton-reference-model"],
                  ["--triton-instances", "0"],
                  ["--readout", "lstsq"],
                  ["--readout", "refine", "--triton-backend", "onnx"],
                  ["--readout", "refine", "--saelens", str(tmp_path / "sl")]):
        res = runner.invoke(app, ["export", str(source), "--triton-repo",
                                  str(tmp_path / "bad"), *extra])
        assert isinstance(res.exception, HSAEError), (extra, res.output)
