"""Triton model repository: config.pbtxt parses as Triton's ModelConfig; the model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.errors import ConfigError
from hsae_runtime.exporters.triton_repo import config_pbtxt, export_triton_repo

ort = pytest.importorskip("onnxruntime")


def parse(text: str):
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient absent")
    from google.protobuf import text_format

    return text_format.Parse(text, mc.ModelConfig())


def make_sae() -> SAE:
    sae = SAE(SAEConfig(d_in=24, d_sae=64, k_max=8))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_repository_layout_config_and_model(tmp_path):
    sae = make_sae()
    cfg_path, exported = export_triton_repo(
        sae, tmp_path / "repo", name="sae_l12", budgets_out=[2, 4], max_batch_size=32,
        queue_delay_us=250,
    )
    assert cfg_path == tmp_path / "repo" / "sae_l12" / "config.pbtxt"
    assert exported.path == tmp_path / "repo" / "sae_l12" / "1" / "model.onnx"
    cfg = parse(cfg_path.read_text())
    assert cfg.name == "sae_l12" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    inputs = {i.name: i for i in cfg.input}
    assert list(inputs["x"].dims) == [24]
    assert list(inputs["k"].dims) == [1] and list(inputs["k"].reshape.shape) == []
    outputs = {o.name: list(o.dims) for o in cfg.output}
    assert outputs == {"values": [8], "indices": [8], "reconstruction": [24],
                       "reconstructions": [2, 24]}

    # The graph's names and per-item shapes agree with the config (batch dim first).
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == set(inputs)
    assert {o.name for o in sess.get_outputs()} == set(outputs)
    x = np.random.randn(3, 24).astype(np.float32)
    got = sess.run(None, {"x": x, "k": np.array([1, 5, 8], dtype=np.int64)})
    for arr, out in zip(got, sess.get_outputs()):
        assert list(arr.shape[1:]) == outputs[out.name]


def test_reuses_an_exported_graph_with_external_data(tmp_path):
    from hsae_runtime.exporters.onnx import export_onnx

    sae = make_sae()
    graph = export_onnx(sae, tmp_path / "g" / "sae.onnx", external_data=True)
    _, exported = export_triton_repo(sae, tmp_path / "repo", name="m", reuse=graph)
    assert [p.name for p in exported.files] == ["model.onnx", "sae.onnx.data"]
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x = np.random.randn(2, 24).astype(np.float32)
    vals = sess.run(["values"], {"x": x, "k": np.array([8, 8], dtype=np.int64)})[0]
    torch.testing.assert_close(torch.from_numpy(vals), sae.encode(torch.from_numpy(x), 8).values)


def test_instance_group_and_fp16():
    cfg = parse(config_pbtxt("m", d_in=4, k_max=2, dtype="float16", instance_kind="gpu"))
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    from google.protobuf import text_format

    assert "data_type: TYPE_FP16" in text_format.MessageToString(cfg.input[0])


def test_bad_names():
    with pytest.raises(ConfigError):
        config_pbtxt("a/b", d_in=4, k_max=2)
    with pytest.raises(ConfigError):
        config_pbtxt("m", d_in=4, k_max=2, max_batch_size=0)
