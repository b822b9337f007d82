"""Latent labels from a features folder: ``EncodeResult.describe(k)``, the encode table, and
``hsae-runtime encode --features DIR`` against a live server on the tiny LM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hsae_runtime.serving import build_proto

build_proto.ensure()  # generated stubs are build outputs: make sure they exist and are current

from hsae_runtime.client import Client  # noqa: E402
from hsae_runtime.client_results import EncodeResult, LatentLabel, format_table  # noqa: E402
from hsae_runtime.errors import DataError  # noqa: E402
from hsae_runtime.features.build import build_features  # noqa: E402
from hsae_runtime.features.cache import CacheSpec  # noqa: E402
from hsae_runtime.features.labels import load_labels  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _result(labels: dict[int, str]) -> EncodeResult:
    values = np.array([[3.0, 2.0, 1.0], [4.0, 0.0, 0.0]], np.float32)
    indices = np.array([[7, 1, 9], [5, -1, -1]], np.int32)
    return EncodeResult(k=3, values=values, indices=indices, budgets=[2, 3],
                        tokens=["The", " cat"], labels=labels)


def test_describe_lists_kept_latents_with_labels():
    res = _result({7: "'cat'", 5: "'dog'"})
    assert res.describe(2) == [[LatentLabel(7, 3.0, "'cat'"), LatentLabel(1, 2.0, "")],
                               [LatentLabel(5, 4.0, "'dog'")]]
    assert [len(row) for row in res.describe(3)] == [3, 1]
    table = format_table(res, top=3)
    assert "7:3.00['cat']" in table and "1:2.00 |" in table and "5:4.00['dog']" in table


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory, tiny_sae_path, sae, lm, tiny_text_file):
    out = tmp_path_factory.mktemp("labels") / "features"
    build_features(tiny_sae_path, sae, lm, tiny_text_file, out,
                   CacheSpec(tokens=512, context=32, lm_batch=4, shard_contexts=4),
                   export=False, progress=False)
    return out


def test_client_and_cli_label_latents(features_dir, sae, lm, tmp_path):
    from serving_helpers import TEXT, running_server
    from typer.testing import CliRunner

    from hsae_runtime.cli import app

    labels = load_labels(features_dir)
    rows = json.loads((features_dir / "data" / "summary.json").read_text())
    assert labels[rows[0]["id"]].startswith(repr(rows[0]["top_tokens"][0]))
    with running_server(sae, lm) as running:
        address = f"127.0.0.1:{running.port}"
        with Client(address, features=features_dir) as client:
            res = client.encode(text=TEXT, budgets=[4])
        described = res.describe(4)
        assert len(described) == len(res.tokens)
        assert all(item.label == labels[item.latent] for row in described for item in row)
        out = CliRunner().invoke(app, ["encode", TEXT, "--server", address, "--budgets", "4",
                                       "--top", "4", "--features", str(features_dir)])
    assert out.exit_code == 0, out.output
    first = described[0][0]
    assert f"{first.latent}:{first.value:.2f}[{first.label}]" in out.output
    with pytest.raises(DataError, match="no latent summary"):
        Client(address, features=tmp_path)
