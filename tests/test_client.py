"""The Python client: request building, result slicing, the table, message-size limits."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from hsae_runtime.serving import build_proto

build_proto.ensure()  # generated stubs are build outputs: make sure they exist and are current

from hsae_runtime.client import Client, ServerError  # noqa: E402
from hsae_runtime.client_results import EncodeResult, format_table  # noqa: E402
from hsae_runtime.config import SAEConfig  # noqa: E402
from hsae_runtime.errors import InputError  # noqa: E402
from hsae_runtime.sae import SAE  # noqa: E402
from hsae_runtime.serving import server as srv  # noqa: E402
from hsae_runtime.serving.backend import TorchBackend  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _result() -> EncodeResult:
    values = np.array([[3.0, 2.0, 1.0, 0.5], [4.0, 0.0, 0.0, 0.0]], np.float32)
    indices = np.array([[7, 1, 9, 2], [5, -1, -1, -1]], np.int32)
    return EncodeResult(
        k=4,
        values=values,
        indices=indices,
        budgets=[2, 4],
        tokens=["The", " cat"],
        fvu={2: np.array([0.5, 0.25], np.float32), 4: np.array([0.1, 0.2], np.float32)},
    )


def test_codes_slices_nested_prefixes():
    res = _result()
    values, indices = res.codes(2)
    assert indices.tolist() == [[7, 1], [5, -1]] and values.shape == (2, 2)
    for bad in (0, 5):
        with pytest.raises(InputError):
            res.codes(bad)


def test_format_table_marks_budget_boundaries():
    table = format_table(_result(), top=4)
    lines = table.splitlines()
    assert "fvu@2" in lines[0] and "fvu@4" in lines[0]
    assert "7:3.00 1:2.00 | 9:1.00 2:0.50" in lines[2]
    assert lines[3].rstrip().endswith("5:4.00")  # masked tail entries are not shown


def test_encode_request_building():
    req = Client.encode_request(activations=torch.ones(2, 3, dtype=torch.float64), budgets=[4])
    assert list(req.activations.shape) == [2, 3] and len(req.activations.data) == 2 * 3 * 4
    req = Client.encode_request(tokens=np.array([[1, 2, 3]]), budgets=[1, 2])
    assert list(req.tokens.ids) == [1, 2, 3] and list(req.budgets) == [1, 2]
    with pytest.raises(InputError):
        Client.encode_request(budgets=[4])
    with pytest.raises(InputError):
        Client.encode_request(text="a", tokens=[1], budgets=[4])
    with pytest.raises(InputError):
        Client.encode_request(text="a", budgets=[4], output_dtype="int8")


def test_unreachable_server_raises_server_error():
    with Client("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(ServerError) as info:
            c.info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_message_size_limits_are_explicit():
    """456x2304 float32 (4.2 MB) is over gRPC's 4 MiB default but within our limits."""
    sae = SAE(SAEConfig(d_in=2304, d_sae=32, k_max=8)).requires_grad_(False)
    running = srv.start(TorchBackend(sae), options=srv.ServerOptions(port=0))
    x = np.random.default_rng(0).standard_normal((456, 2304)).astype(np.float32)
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            res = c.encode(activations=x, budgets=[8])
            np.testing.assert_array_equal(res.indices, sae.encode(torch.from_numpy(x), 8).indices)
        with Client(f"127.0.0.1:{running.port}", max_message_bytes=4 * 2**20) as small:
            with pytest.raises(ServerError) as info:
                small.encode(activations=x, budgets=[8])
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace=1)
