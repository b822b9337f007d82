"""ONNX export: the graph keeps k dynamic, masks per row, decodes sparsely, and is validated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.errors import ConfigError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hsae_runtime.exporters.onnx import (  # noqa: E402
    OnnxValidationError,
    build_onnx_model,
    export_onnx,
)
from hsae_runtime.exporters.onnx_format import graph_metadata  # noqa: E402


def make_sae(d_in: int = 32, d_sae: int = 96, k_max: int = 12, **kw) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k_max=k_max, hookpoint="blocks.0", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def run(path, x: torch.Tensor, k: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": x.numpy(), "k": k})))


def test_graph_matches_torch_per_row_k(tmp_path):
    sae = make_sae()
    out = export_onnx(sae, tmp_path / "m.onnx", decode_chunk=5)
    assert out.report is not None and out.report.ok and out.report.cases >= 8
    x = torch.randn(9, 32)
    k = np.array([1, 2, 3, 12, 12, 7, 5, 11, 4], dtype=np.int64)
    got = run(out.path, x, k)
    ref = sae.encode(x, torch.from_numpy(k))
    torch.testing.assert_close(torch.from_numpy(got["values"]), ref.values, rtol=1e-5, atol=1e-6)
    # masked tails are exactly (0, -1)
    pos = np.arange(12)[None, :] >= k[:, None]
    assert (got["indices"][pos] == -1).all() and (got["values"][pos] == 0).all()
    torch.testing.assert_close(
        torch.from_numpy(got["reconstruction"]), sae.decode(ref), rtol=1e-5, atol=1e-5
    )


def test_k_stays_dynamic_and_batch_is_dynamic(tmp_path):
    sae = make_sae()
    path = export_onnx(sae, tmp_path / "m.onnx").path
    model = onnx.load(str(path))
    k_input = next(i for i in model.graph.input if i.name == "k")
    assert k_input.type.tensor_type.shape.dim[0].dim_param == "N"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, kk in ((1, 1), (4, 6), (17, 12)):
        vals, idx, _ = sess.run(None, {"x": np.random.randn(n, 32).astype(np.float32),
                                       "k": np.full(n, kk, dtype=np.int64)})
        assert vals.shape == (n, 12)
        assert ((idx >= 0).sum(1) == kk).all()  # the budget really changes the output


def test_no_dense_decoder_matmul(tmp_path):
    """The decoder is gathered: W_dec is only read by Gather nodes."""
    model = build_onnx_model(make_sae(), budgets_out=[2, 6])
    users = {n.op_type for n in model.graph.node if "W_dec" in n.input}
    assert users == {"Gather"}
    assert model.opset_import[0].version >= 17


def test_budgets_out(tmp_path):
    sae = make_sae()
    out = export_onnx(sae, tmp_path / "m.onnx", budgets_out=[8, 2, 12], decode_chunk=4)
    assert json.loads(graph_metadata(out.path)["hsae_budgets_out"]) == [2, 8, 12]
    x = torch.randn(5, 32)
    got = run(out.path, x, np.full(5, 3, dtype=np.int64))
    assert got["reconstructions"].shape == (5, 3, 32)
    ref = sae.reconstruct(x, [2, 8, 12]).permute(1, 0, 2)  # (N, n_budgets, d_in)
    torch.testing.assert_close(torch.from_numpy(got["reconstructions"]), ref,
                               rtol=1e-5, atol=1e-5)


def test_float16_graph(tmp_path):
    sae = make_sae()
    out = export_onnx(sae, tmp_path / "h.onnx", dtype="float16")
    assert out.report is not None and out.report.ok
    sess = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)"


def test_external_data_round_trip(tmp_path):
    sae = make_sae(apply_b_dec_to_input=False)
    out = export_onnx(sae, tmp_path / "big" / "m.onnx", external_data=True)
    assert out.external_data and (tmp_path / "big" / "m.onnx.data").is_file()
    assert out.path.stat().st_size < 10_000  # the weights live in the data file
    assert out.report is not None and out.report.ok


def test_failed_validation_deletes_the_graph(tmp_path, monkeypatch):
    import hsae_runtime.exporters.onnx as mod

    sae = make_sae()
    real = mod.build_onnx_model

    def broken(*args, **kwargs):
        model = real(*args, **kwargs)
        for t in model.graph.initializer:  # corrupt the encoder bias
            if t.name == "b_enc":
                arr = onnx.numpy_helper.to_array(t).copy() + 1.0
                t.CopyFrom(onnx.numpy_helper.from_array(arr, "b_enc"))
        return model

    monkeypatch.setattr(mod, "build_onnx_model", broken)
    with pytest.raises(OnnxValidationError, match="disagrees"):
        export_onnx(sae, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_bad_options():
    with pytest.raises(ConfigError, match="budgets_out"):
        build_onnx_model(make_sae(), budgets_out=[0, 3])
    with pytest.raises(ConfigError, match="dtype"):
        build_onnx_model(make_sae(), dtype="int8")  # type: ignore[arg-type]
