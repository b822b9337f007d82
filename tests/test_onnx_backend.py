"""The ONNX Runtime backend behaves like the torch SAE on the surface the server uses."""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import SAE, SAEConfig
from hsae_runtime.errors import InputError, ModelFileError

pytest.importorskip("onnxruntime")

from hsae_runtime.exporters.onnx import export_onnx  # noqa: E402
from hsae_runtime.onnx_backend import OnnxSAE  # noqa: E402


@pytest.fixture(scope="module")
def sae_file(tmp_path_factory) -> tuple[SAE, object]:
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=32, d_sae=80, k_max=20, hookpoint="h"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    sae.save(path)
    return sae, path


@pytest.fixture(scope="module", params=["model_file", "onnx"])
def backend(request, sae_file, tmp_path_factory) -> OnnxSAE:
    sae, path = sae_file
    if request.param == "model_file":
        return OnnxSAE.from_model_file(path, threads=1)
    graph = tmp_path_factory.mktemp("g") / "m.onnx"
    export_onnx(sae, graph)
    return OnnxSAE.from_onnx(graph, threads=1)


def test_encode_matches_torch(backend, sae_file):
    sae, _ = sae_file
    assert backend.config == sae.config
    assert "CPUExecutionProvider" in backend.providers
    x = torch.randn(2, 5, 32)
    for k in (1, 7, 20):
        got, ref = backend.encode(x, k), sae.encode(x, k)
        assert got.values.shape == (2, 5, k) and got.indices.dtype == torch.int64
        torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.indices, ref.indices)
    k_rows = torch.tensor([3, 1, 9, 9, 2, 4, 5, 6, 7, 8])
    got, ref = backend.encode(x, k_rows), sae.encode(x, k_rows)
    assert got.values.shape == (2, 5, 9)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.indices, ref.indices)


def test_decode_and_multi_budget(backend, sae_file):
    sae, _ = sae_file
    x = torch.randn(6, 32)
    code = sae.encode(x, 20)
    torch.testing.assert_close(backend.decode(code), sae.decode(code), rtol=1e-5, atol=1e-5)
    budgets = [20, 4, 1, 17]
    torch.testing.assert_close(backend.reconstruct_from_code(code, budgets),
                               sae.reconstruct_from_code(code, budgets), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.reconstruct(x.reshape(2, 3, 32), [2, 5]),
                               sae.reconstruct(x.reshape(2, 3, 32), [2, 5]), rtol=1e-5, atol=1e-5)
    masked = sae.encode(x, torch.tensor([1, 2, 3, 20, 5, 6]))
    torch.testing.assert_close(backend.decode(masked), sae.decode(masked), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.b_dec, sae.b_dec.detach())


def test_errors(backend):
    with pytest.raises(InputError, match="k_max"):
        backend.encode(torch.randn(2, 32), 21)
    with pytest.raises(InputError, match="d_in"):
        backend.encode(torch.randn(2, 31), 2)
    with pytest.raises(InputError, match="NaN"):
        backend.encode(torch.full((1, 32), float("nan")), 2)
    with pytest.raises(InputError, match="rows"):
        backend.encode(torch.randn(2, 32), torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="budget"):
        backend.reconstruct(torch.randn(2, 32), [0])


def test_foreign_onnx_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ModelFileError, match="not one exported"):
        OnnxSAE.from_onnx(tmp_path / "other.onnx")


def test_large_model_goes_through_external_data(sae_file, monkeypatch):
    """Graphs past protobuf's 2 GB limit are built on disk; faked here with a tiny threshold."""
    import hsae_runtime.exporters.onnx as exporter

    sae, path = sae_file
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 100)
    backend = OnnxSAE.from_model_file(path, threads=1)
    assert backend._tmp is not None
    x = torch.randn(3, 32)
    torch.testing.assert_close(backend.encode(x, 5).values, sae.encode(x, 5).values,
                               rtol=1e-5, atol=1e-6)
