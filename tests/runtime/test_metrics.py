"""The metrics module: plain counters on the hot path, correct exposition, worker merge."""

from __future__ import annotations

import subprocess

from prometheus_client import generate_latest

from proxy.runtime.metrics import LATENCY_BUCKETS, Metrics, make_registry


def scrape(m: Metrics, values=None) -> str:
    return generate_latest(make_registry(m, values)).decode()


def test_counter_histogram_and_gauge_exposition():
    m = Metrics()
    m.requests.inc(("allow", "allowed"))
    m.requests.inc(("allow", "allowed"))
    m.requests.inc(("deny", "no_matching_rule"))
    m.request_duration.observe(0.0003, ("allow",))
    m.request_duration.observe(0.002, ("allow",))
    m.request_duration.observe(99.0, ("allow",))
    m.connections_active.inc(n=3)
    text = scrape(m)
    assert 'portcullis_requests_total{code="allowed",decision="allow"} 2.0' in text
    assert 'portcullis_request_duration_seconds_bucket{decision="allow",le="0.0005"} 1.0' in text
    assert 'portcullis_request_duration_seconds_bucket{decision="allow",le="0.0025"} 2.0' in text
    assert 'portcullis_request_duration_seconds_bucket{decision="allow",le="30.0"} 2.0' in text
    assert 'portcullis_request_duration_seconds_bucket{decision="allow",le="+Inf"} 3.0' in text
    assert 'portcullis_request_duration_seconds_count{decision="allow"} 3.0' in text
    assert "portcullis_connections_active 3.0" in text
    assert 'portcullis_build_info{version="' in text


def test_bucket_boundaries_are_inclusive():
    m = Metrics()
    m.decision_duration.observe(LATENCY_BUCKETS[0])
    text = scrape(m)
    assert f'portcullis_decision_duration_seconds_bucket{{le="{LATENCY_BUCKETS[0]!r}"}} 1.0' in text


def test_function_backed_metrics_are_read_at_scrape_time():
    m = Metrics()
    box = {"n": 1}
    m.audit_records.fn = lambda: box["n"]
    m.audit_queue.fn = lambda: 7
    box["n"] = 41
    text = scrape(m)
    assert "portcullis_audit_records_total 41.0" in text and "portcullis_audit_queue_records 7.0" in text


def test_merge_sums_counters_and_histograms_and_respects_gauge_modes():
    a, b = Metrics(), Metrics()
    for m, n in ((a, 2), (b, 3)):
        for _ in range(n):
            m.requests.inc(("allow", "allowed"))
            m.request_duration.observe(0.001, ("allow",))
        m.svid_expiry.set(1000.0 * n)  # merge: min
        m.connections_active.set(n)  # merge: sum
    merged = Metrics().merged([a.snapshot(), b.snapshot()])
    text = scrape(Metrics(), lambda: merged)
    assert 'portcullis_requests_total{code="allowed",decision="allow"} 5.0' in text
    assert 'portcullis_request_duration_seconds_count{decision="allow"} 5.0' in text
    assert "portcullis_svid_expiry_timestamp_seconds 2000.0" in text
    assert "portcullis_connections_active 5.0" in text


def test_exposition_passes_promtool():
    m = Metrics()
    m.requests.inc(("deny", "svid_untrusted"))
    m.upstream_errors.inc(("upstream_timeout",))
    m.request_duration.observe(0.01, ("deny",))
    p = subprocess.run(["promtool", "check", "metrics"], input=scrape(m).encode(), capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_metric_is_prefixed_and_counters_end_in_total():
    m = Metrics()
    for metric in m._all:
        assert metric.name.startswith("portcullis_")
        assert (metric.kind == "counter") == metric.name.endswith("_total"), metric.name
