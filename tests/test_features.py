"""hsae_runtime.features on the tiny LM: the code cache, statistics against a token-by-token
reference, resume and determinism, exports against SAEDashboard's schema, labels and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsae_runtime.errors import ConfigError, DataError, InputError
from hsae_runtime.features.build import build_features
from hsae_runtime.features.cache import CacheSpec, CodeCache, build_cache, cache_key, index_dtype
from hsae_runtime.features.stats import StatsSpec, compute_stats, default_budgets, model_budgets

SPEC = CacheSpec(tokens=1024, context=32, lm_batch=4, shard_contexts=8)
FIXTURE = Path(__file__).parent / "fixtures" / "neuronpedia_batch.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sae_path, sae, lm, tiny_text_file) -> Path:
    out = tmp_path_factory.mktemp("features") / "run"
    build_features(tiny_sae_path, sae, lm, tiny_text_file, out, SPEC, progress=False)
    return out


@pytest.fixture(scope="module")
def cache(built) -> CodeCache:
    return CodeCache(built / "cache")


def _tokens(cache: CodeCache):
    """All cached tokens: ``(indices [N, k], values [N, k], token_ids, counted)``."""
    shards = list(cache.shards())
    return (torch.cat([s.indices for s in shards]), torch.cat([s.values for s in shards]),
            torch.cat([s.token_ids for s in shards]), torch.cat([s.counted for s in shards]))


def test_cache_round_trip(cache, sae, lm, tiny_text_file):
    from hsae_runtime.lm import capture, special_token_mask
    from hsae_runtime.training.data import iter_contexts, read_documents

    contexts = iter_contexts(read_documents(tiny_text_file), lm.tokenizer, SPEC.context)
    ids = torch.stack([c for _, c in zip(range(SPEC.n_contexts), contexts)])  # (C, T)
    with torch.inference_mode():
        code = sae.encode(capture(lm, sae.config.hookpoint, ids).reshape(-1, 64), sae.config.k_max)
    indices, values, token_ids, counted = _tokens(cache)
    assert torch.equal(token_ids, ids.reshape(-1))
    assert torch.equal(indices, code.indices)
    assert torch.equal(values, code.values.to(torch.float16).float())
    assert torch.equal(counted, ~special_token_mask(lm.tokenizer, ids).reshape(-1))
    manifest = cache.manifest()
    assert manifest["tokens"] == ids.numel() and manifest["shards"] == SPEC.n_contexts // 8
    shard = cache.read_shard(0)
    assert torch.equal(shard.offsets, torch.arange(0, 8 * 32 + 1, 32))
    assert torch.equal(shard.context_ids, torch.arange(8))


def test_index_dtype_is_the_narrowest_that_fits(cache):
    from safetensors import safe_open

    assert index_dtype(256) == torch.uint16 and index_dtype(1 << 16) == torch.uint16
    assert index_dtype((1 << 16) + 1) == torch.int32
    with safe_open(str(cache.shard_path(0)), framework="pt") as f:
        assert f.get_tensor("indices").dtype == torch.uint16
        assert f.get_tensor("values").dtype == torch.float16


def _naive(cache: CodeCache, budgets: list[int], d_sae: int):
    """Token-by-token Python reference: per budget, firing counts, value sums and maxima, and
    every firing value per latent; per latent its rank counts."""
    indices, values, _, counted = _tokens(cache)
    k = indices.shape[1]
    fires = [[0] * d_sae for _ in budgets]
    sums = [[0.0] * d_sae for _ in budgets]
    maxes = [[0.0] * d_sae for _ in budgets]
    seen: list[list[list[float]]] = [[[] for _ in range(d_sae)] for _ in budgets]
    ranks = [[0] * k for _ in range(d_sae)]
    n = 0
    for t in range(len(indices)):
        if not counted[t]:
            continue
        n += 1
        for r in range(k):
            v, lat = float(values[t, r]), int(indices[t, r])
            if v <= 0:
                continue
            ranks[lat][r] += 1
            for bi, b in enumerate(budgets):
                if r < b:
                    fires[bi][lat] += 1
                    sums[bi][lat] += v
                    maxes[bi][lat] = max(maxes[bi][lat], v)
                    seen[bi][lat].append(v)
    return n, fires, sums, maxes, seen, ranks


@pytest.fixture(scope="module")
def stats_and_naive(cache, sae):
    budgets = list(model_budgets(sae.config.trained_budgets, sae.config.k_max))
    stats = compute_stats(cache, StatsSpec(budgets=tuple(budgets), top_n=5), progress=False)
    return stats, _naive(cache, budgets, sae.config.d_sae)


def test_statistics_equal_a_token_by_token_reference(stats_and_naive):
    stats, (n, fires, sums, maxes, _, ranks) = stats_and_naive
    assert stats.n_tokens == n
    assert stats.fires().tolist() == fires
    assert torch.allclose(stats.density(), torch.tensor(fires, dtype=torch.float64) / n)
    mean = torch.tensor(sums, dtype=torch.float64) / torch.tensor(fires).clamp_min(1)
    assert torch.allclose(stats.mean_activation(), mean, atol=1e-6)
    assert torch.allclose(stats.max_activation().double(), torch.tensor(maxes, dtype=torch.float64))
    assert stats.rank_hist.tolist() == ranks
    first = [next((b for b, f in zip(stats.budgets, col) if f), 0) for col in zip(*fires)]
    assert stats.first_budget().tolist() == first
    assert sum(1 for f in fires[-1] if f) > 10  # the reference is not vacuous


def test_rank_histogram_sums_to_the_firing_count(stats_and_naive):
    stats, (_, fires, *_rest) = stats_and_naive
    for bi, b in enumerate(stats.budgets):
        assert stats.rank_hist[:, :b].sum(1).tolist() == fires[bi]


def test_top_n_are_the_n_largest(stats_and_naive, cache):
    stats, (_, _, _, _, seen, _) = stats_and_naive
    indices, values, _, _ = _tokens(cache)
    for bi, b in enumerate(stats.budgets):
        for lat in range(stats.d_sae):
            want = sorted(seen[bi][lat], reverse=True)[:5]
            got = [v for v in stats.top_values[bi, lat].tolist() if v > float("-inf")]
            assert got == pytest.approx(want), (b, lat)
            for v, pos in zip(got, stats.top_pos[bi, lat].tolist()):  # positions hold them
                slot = (indices[pos] == lat).nonzero().squeeze(1)
                assert len(slot) == 1 and int(slot) < b and float(values[pos, slot]) == v


def test_quantile_samples_lie_in_their_interval(stats_and_naive, cache):
    stats, _ = stats_and_naive
    indices, values, _, _ = _tokens(cache)
    checked = 0
    for lat in range(stats.d_sae):
        edges = stats.quantile_edges[lat].tolist()
        assert edges == sorted(edges)
        assert int(stats.quantile_count[lat].sum()) == int(stats.rank_hist[lat].sum())
        for q, positions in enumerate(stats.sample_pos[lat].tolist()):
            for pos in (p for p in positions if p >= 0):
                v = float(values[pos][indices[pos] == lat])
                assert edges[q] - 1e-6 <= v <= edges[q + 1] + 1e-6 or q == 0
                checked += 1
    assert checked > 50


def test_report_records_match_the_statistics(built, stats_and_naive):
    stats, _ = stats_and_naive
    rows = json.loads((built / "data" / "summary.json").read_text())
    meta = json.loads((built / "data" / "meta.json").read_text())
    assert len(rows) == stats.d_sae and meta["budgets"] == stats.budgets == [1, 2, 4, 8, 16]
    chunk = json.loads((built / "data" / "latents" / "0000.json").read_text())
    rec = max(chunk, key=lambda r: r["density"][-1])
    assert rec["rank_hist"] == stats.rank_hist[rec["id"]].tolist()
    top = rec["contexts"][rec["top"][-1][0]]
    assert top["v"][top["at"]] == pytest.approx(float(stats.top_values[-1, rec["id"], 0]), abs=1e-3)
    for name in ("index.html", "assets/app.js", "assets/app.css"):
        assert (built / name).is_file()
    html = (built / "index.html").read_text()
    assert "http" not in html.replace("http-equiv", "")  # nothing fetched from the network


def test_two_runs_write_identical_json(built, tmp_path, tiny_sae_path, sae, lm, tiny_text_file):
    again = tmp_path / "again"
    build_features(tiny_sae_path, sae, lm, tiny_text_file, again, SPEC, progress=False)
    files = sorted(p.relative_to(built) for p in built.rglob("*.json"))
    assert len(files) > 10
    for rel in files:
        text = (built / rel).read_text()
        assert text == (again / rel).read_text(), rel
        assert str(tmp_path.parent.parent) not in text and str(Path.home()) not in text


def test_resume_after_interrupt_gives_identical_files(built, tmp_path, monkeypatch, tiny_sae_path,
                                                      sae, lm, tiny_text_file):
    import hsae_runtime.format as fmt

    key = cache_key(tiny_sae_path, sae, lm, sae.config.hookpoint, tiny_text_file, SPEC)
    real, calls = fmt.atomic_save_tensors, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    folder = tmp_path / "cache"
    monkeypatch.setattr(fmt, "atomic_save_tensors", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(folder, sae, lm, tiny_text_file, SPEC, key=key, progress=False)
    monkeypatch.setattr(fmt, "atomic_save_tensors", real)
    assert not (folder / "manifest.json").exists()
    times = build_cache(folder, sae, lm, tiny_text_file, SPEC, key=key, progress=False)
    assert times.resumed_shards == 2
    names = sorted(p.name for p in (built / "cache").iterdir())
    assert names == sorted(p.name for p in folder.iterdir())
    for name in names:
        assert (folder / name).read_bytes() == (built / "cache" / name).read_bytes(), name


def test_a_complete_cache_is_reused_and_other_settings_refused(built, tiny_sae_path, sae, lm,
                                                               tiny_text_file):
    key = cache_key(tiny_sae_path, sae, lm, sae.config.hookpoint, tiny_text_file, SPEC)
    times = build_cache(built / "cache", sae, lm, tiny_text_file, SPEC, key=key, progress=False)
    assert times.lm_s == 0.0
    other = CacheSpec(tokens=2048, context=32, lm_batch=4, shard_contexts=8)
    key2 = cache_key(tiny_sae_path, sae, lm, sae.config.hookpoint, tiny_text_file, other)
    with pytest.raises(ConfigError, match="other settings"):
        build_cache(built / "cache", sae, lm, tiny_text_file, other, key=key2, progress=False)


def test_the_refine_readout_is_part_of_the_cache_key(built, tiny_sae_path, lm, tiny_text_file):
    from hsae_runtime.sae import SAE

    refined = SAE.load(tiny_sae_path).requires_grad_(False).set_readout("refine")
    key = cache_key(tiny_sae_path, refined, lm, refined.config.hookpoint, tiny_text_file, SPEC)
    assert key["readout"] == "refine"
    with pytest.raises(ConfigError, match="other settings"):
        build_cache(built / "cache", refined, lm, tiny_text_file, SPEC, key=key, progress=False)


def _shape(value):
    """A value's JSON shape: dict keys recursively, list element shapes, scalars by kind."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", *({json.dumps(_shape(v), sort_keys=True) for v in value})]
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


def test_neuronpedia_export_has_saedashboards_shape(built):
    fixture = json.loads(FIXTURE.read_text())
    fixture.pop("_source")
    want_batch = set(fixture)
    want_feature = _shape(fixture["features"][0])
    want_activation = _shape(fixture["features"][0]["activations"][0])
    batches = sorted((built / "neuronpedia").glob("k*/batch-*.json"))
    assert {p.parent.name for p in batches} == {"k1", "k2", "k4", "k8", "k16"}
    for path in batches:
        batch = json.loads(path.read_text())
        assert set(batch) == want_batch
        assert isinstance(batch["layer"], int) and batch["sae_set"].endswith(path.parent.name)
        for feature in batch["features"]:
            assert set(feature) == set(want_feature)
            for name, shape in _shape(feature).items():
                if name != "activations" and shape != ["list"]:  # empty lists carry no types
                    assert shape == want_feature[name] or shape[0] == want_feature[name][0], name
            for act in feature["activations"]:
                assert _shape(act) == want_activation
                assert len(act["tokens"]) == len(act["values"])
    k1 = json.loads((built / "neuronpedia" / "k1" / "batch-0.json").read_text())
    k16 = json.loads((built / "neuronpedia" / "k16" / "batch-0.json").read_text())
    assert sum(f["frac_nonzero"] for f in k1["features"]) < sum(
        f["frac_nonzero"] for f in k16["features"])


def test_bad_inputs_raise_typed_errors(tmp_path, cache):
    with pytest.raises(ConfigError, match="multiple of lm_batch"):
        CacheSpec(tokens=10, lm_batch=4, shard_contexts=6)
    with pytest.raises(ConfigError, match="positive int"):
        CacheSpec(tokens=0)
    with pytest.raises(ConfigError, match="exceeds the cached k"):
        compute_stats(cache, StatsSpec(budgets=(1, 32)), progress=False)
    with pytest.raises(ConfigError, match="sorted"):
        StatsSpec(budgets=(4, 2))
    with pytest.raises(DataError, match="no complete code cache"):
        CodeCache(tmp_path).manifest()
    (tmp_path / "shard_00000.safetensors").write_bytes(b"junk")
    from hsae_runtime.errors import ModelFileError

    with pytest.raises(ModelFileError, match="not a readable"):
        CodeCache(tmp_path).read_shard(0)


def test_budget_defaults():
    assert default_budgets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_budgets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert model_budgets(tuple(range(1, 17)), 16) == (1, 2, 4, 8, 16)
    assert model_budgets((4, 16), 16) == (4, 16)


def test_labels(built, tmp_path):
    from hsae_runtime.features.labels import load_labels

    labels = load_labels(built)
    assert len(labels) == 256 and all(isinstance(v, str) for v in labels.values())
    assert sum(1 for v in labels.values() if v) > 200
    with pytest.raises(DataError, match="no latent summary"):
        load_labels(tmp_path)


def test_cli_features(tmp_path, tiny_sae_path, tiny_lm_dir, tiny_text_file):
    from typer.testing import CliRunner

    from hsae_runtime.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "features", str(tiny_sae_path), "--lm", str(tiny_lm_dir), "--data", str(tiny_text_file),
        "--out", str(out), "--tokens", "256", "--context", "32", "--lm-batch", "4",
        "--shard-contexts", "4", "--budgets", "2,8", "--no-export", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "data" / "meta.json").read_text())["budgets"] == [2, 8]
    assert not (out / "neuronpedia").exists()
    bad = CliRunner().invoke(app, [
        "features", str(tiny_sae_path), "--lm", str(tiny_lm_dir), "--data", str(tiny_text_file),
        "--out", str(tmp_path / "bad"), "--budgets", "99", "--device", "cpu"])
    assert isinstance(bad.exception, InputError) and "out of range" in str(bad.exception)
    assert not (tmp_path / "bad").exists()  # refused before any LM work
