"""Server metrics: own registry per instance, what each observation records, the /metrics scrape."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hsae_runtime.serving.metrics import ServerMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_instance_has_its_own_registry():
    a, b = ServerMetrics(), ServerMetrics()
    a.observe_request("Encode", "OK", 0.01)
    got_a = samples(a.exposition().decode())
    got_b = samples(b.exposition().decode())
    key = ("hsae_requests_total", (("route", "Encode"), ("status", "OK")))
    assert got_a[key] == 1
    assert key not in got_b


def test_requests_batches_and_generation_are_recorded():
    m = ServerMetrics()
    m.observe_request("Encode", "OK", 0.02)
    m.observe_request("Encode", "OK", 0.03)
    m.observe_request("POST /v1/encode", "400", 0.001)
    with pytest.raises(RuntimeError), m.track("Decode"):
        raise RuntimeError("boom")
    with m.track("Info") as state:
        state.status = "UNAUTHENTICATED"
    m.observe_batch(
        rows=48,
        requests=3,
        queue_depth=2,
        seconds=0.5,
        lm_seconds=0.3,
        sae_seconds=0.1,
        lm_tokens=50,
    )
    m.observe_generation_step(tokens=4, seconds=0.2, lm_seconds=0.15, sae_seconds=0.03)
    got = samples(m.exposition().decode())
    assert got[("hsae_requests_total", (("route", "Encode"), ("status", "OK")))] == 2
    assert got[("hsae_requests_total", (("route", "POST /v1/encode"), ("status", "400")))] == 1
    assert got[("hsae_requests_total", (("route", "Decode"), ("status", "ERROR")))] == 1
    assert got[("hsae_requests_total", (("route", "Info"), ("status", "UNAUTHENTICATED")))] == 1
    assert got[("hsae_request_seconds_count", (("route", "Encode"),))] == 2
    assert got[("hsae_request_seconds_sum", (("route", "Encode"),))] == pytest.approx(0.05)
    assert got[("hsae_batch_rows_sum", ())] == 48
    assert got[("hsae_batch_requests_sum", ())] == 3
    assert got[("hsae_queue_depth_sum", ())] == 2
    assert got[("hsae_rows_total", ())] == 48
    assert got[("hsae_lm_tokens_total", ())] == 54
    assert got[("hsae_batch_rows_per_second", ())] == pytest.approx(96)
    assert got[("hsae_batch_lm_seconds_sum", ())] == pytest.approx(0.45)
    assert got[("hsae_batch_sae_seconds_count", ())] == 2
    assert got[("hsae_generated_tokens_total", ())] == 4
    assert got[("hsae_generation_tokens_per_second", ())] == pytest.approx(20)


def test_metrics_endpoint_serves_the_registry():
    m = ServerMetrics()
    m.observe_request("Encode", "OK", 0.01)
    server, thread = m.serve(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert samples(text)[("hsae_requests_total", (("route", "Encode"), ("status", "OK")))] == 1
