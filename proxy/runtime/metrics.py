"""Every Prometheus metric of the sidecar, declared once, exposed through an injected registry.

Rules (DESIGN.md section 7):
- Prefix `portcullis_`, base units (seconds, bytes), counters end in `_total`.
- Labels are bounded: decision, code, source, result, would_be. Never SPIFFE IDs, paths, subjects or
  token ids.
- The hot path only does plain dict/int arithmetic (no locks, no label lookups through
  prometheus_client): values live in this module's own small counter/histogram objects and are
  turned into metric families when Prometheus scrapes. All updates happen on the event loop thread.
- With `--workers N` each worker sends `snapshot()` to the supervisor, which serves `merge()`d values:
  counters and histograms are summed, gauges are summed or max'ed as declared.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from proxy import __version__

Labels = tuple[str, ...]

#: Latency buckets in seconds, from 50 us (decision core) to 30 s (upstream timeouts).
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Counter:
    kind = "counter"
    __slots__ = ("name", "help", "labelnames", "values", "fn")

    def __init__(self, name: str, help: str, labelnames: Labels = ()) -> None:
        self.name, self.help, self.labelnames = name, help, labelnames
        self.values: dict[Labels, float] = {} if labelnames else {(): 0}
        #: a counter kept by another component (e.g. the audit sink), read at scrape time
        self.fn: Callable[[], float] | None = None

    def inc(self, labels: Labels = (), n: float = 1) -> None:
        v = self.values
        v[labels] = v.get(labels, 0) + n

    def current(self) -> dict[Labels, float]:
        return {(): float(self.fn())} if self.fn is not None else dict(self.values)


class Gauge:
    kind = "gauge"
    __slots__ = ("name", "help", "labelnames", "values", "fn", "merge")

    def __init__(self, name: str, help: str, labelnames: Labels = (), *,
                 fn: Callable[[], float | Iterable[tuple[Labels, float]]] | None = None,
                 merge: str = "sum") -> None:
        self.name, self.help, self.labelnames = name, help, labelnames
        self.values: dict[Labels, float] = {}
        self.fn = fn
        self.merge = merge  # "sum" | "max" | "min" across workers

    def set(self, value: float, labels: Labels = ()) -> None:
        self.values[labels] = value

    def inc(self, labels: Labels = (), n: float = 1) -> None:
        v = self.values
        v[labels] = v.get(labels, 0) + n

    def current(self) -> dict[Labels, float]:
        if self.fn is None:
            return dict(self.values)
        got = self.fn()
        if isinstance(got, (int, float)):
            return {(): float(got)}
        return dict(got)


class Histogram:
    kind = "histogram"
    __slots__ = ("name", "help", "labelnames", "buckets", "values")

    def __init__(self, name: str, help: str, labelnames: Labels = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.labelnames, self.buckets = name, help, labelnames, buckets
        # labels -> [counts per bucket (+Inf last, not cumulative)..., sum]
        self.values: dict[Labels, list[float]] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, value)] += 1
        row[-1] += value


Metric = Counter | Gauge | Histogram


class Metrics:
    """The sidecar's metrics. Construct one per process and pass it to every component."""

    def __init__(self) -> None:
        self._all: list[Metric] = []
        c, g, h = self._counter, self._gauge, self._histogram
        self.build_info = g("portcullis_build_info", "Build information (value is always 1).",
                            ("version",), merge="max")
        self.build_info.set(1, (__version__,))
        # requests and decisions
        self.requests = c("portcullis_requests_total",
                          "Requests answered, by decision (allow|deny|error) and stable code.",
                          ("decision", "code"))
        self.shadow = c("portcullis_shadow_decisions_total",
                        "Requests let through in shadow mode that enforcement would have decided "
                        "differently, by would-be decision and code.", ("would_be", "code"))
        self.request_duration = h("portcullis_request_duration_seconds",
                                  "Time from request head received to response fully sent.",
                                  ("decision",))
        self.decision_duration = h("portcullis_decision_duration_seconds",
                                   "Time spent in the decision core per request.")
        # tokens (issue: prove the human and the agent)
        self.token_results = c("portcullis_token_verifications_total",
                               "Requests that presented an access token, by result: ok, or the stable "
                               "code of the token/DPoP/binding check that refused it.", ("result",))
        self.dpop_replays = c("portcullis_dpop_replays_total",
                              "DPoP proofs refused because their jti was already used.")
        # connections and TLS
        self.connections_active = g("portcullis_connections_active", "Open client connections.")
        self.connections = c("portcullis_connections_total", "Client connections accepted (TLS done).")
        self.tls_failures = c("portcullis_tls_handshake_failures_total",
                              "TLS handshakes that failed (no or untrusted client certificate, "
                              "protocol errors, timeouts).")
        # upstream
        self.upstream_duration = h("portcullis_upstream_response_duration_seconds",
                                   "Time from request forwarded to upstream response head.")
        self.upstream_errors = c("portcullis_upstream_errors_total",
                                 "Upstream failures by code.", ("code",))
        self.upstream_connects = c("portcullis_upstream_connections_created_total",
                                   "Upstream connections opened.")
        self.upstream_idle = g("portcullis_upstream_idle_connections", "Pooled idle upstream connections.")
        # refreshable inputs (DESIGN rule 6)
        self.refreshes = c("portcullis_refresh_total",
                           "Refresh attempts of svid, trust_bundle and policy inputs by result "
                           "(changed|unchanged|failed).", ("source", "result"))
        self.refresh_last_success = g("portcullis_refresh_last_success_timestamp_seconds",
                                      "Unix time of the last successful refresh per source.",
                                      ("source",), merge="min")
        self.svid_expiry = g("portcullis_svid_expiry_timestamp_seconds",
                             "Unix time when the sidecar's own SVID expires.", merge="min")
        self.policy_info = g("portcullis_policy_info", "Active policy revision (value is always 1).",
                             ("revision",), merge="max")
        self.ready = g("portcullis_ready", "1 when SVID, bundles and policy are loaded and fresh.",
                       merge="min")
        self.draining = g("portcullis_draining", "1 while shutting down.", merge="max")
        # audit
        self.audit_records = c("portcullis_audit_records_total", "Audit records written.")
        self.audit_checkpoints = c("portcullis_audit_checkpoints_total", "Audit checkpoints written.")
        self.audit_write_errors = c("portcullis_audit_write_errors_total", "Audit write failures.")
        self.audit_saturated = c("portcullis_audit_saturated_total",
                                 "Times the audit queue filled up (backpressure or fail-closed applied).")
        self.audit_dropped = c("portcullis_audit_dropped_total",
                               "Audit records dropped past the hard cap (each also logged on stderr).")
        self.audit_queue = g("portcullis_audit_queue_records", "Audit records waiting to be written.")

    def _add(self, m: Metric) -> Any:
        self._all.append(m)
        return m

    def _counter(self, *a: Any, **kw: Any) -> Counter:
        return self._add(Counter(*a, **kw))

    def _gauge(self, *a: Any, **kw: Any) -> Gauge:
        return self._add(Gauge(*a, **kw))

    def _histogram(self, *a: Any, **kw: Any) -> Histogram:
        return self._add(Histogram(*a, **kw))

    # ----------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[Labels, Any]]:
        """Plain values (picklable), for the supervisor of several workers."""
        out: dict[str, dict[Labels, Any]] = {}
        for m in self._all:
            if isinstance(m, Histogram):
                out[m.name] = {k: list(v) for k, v in m.values.items()}
            else:
                out[m.name] = m.current()
        return out

    def merged(self, snapshots: list[dict[str, dict[Labels, Any]]]) -> dict[str, dict[Labels, Any]]:
        out: dict[str, dict[Labels, Any]] = {}
        for m in self._all:
            acc: dict[Labels, Any] = {}
            for snap in snapshots:
                for labels, v in snap.get(m.name, {}).items():
                    if labels not in acc:
                        acc[labels] = list(v) if isinstance(v, list) else v
                    elif isinstance(m, Histogram):
                        acc[labels] = [a + b for a, b in zip(acc[labels], v)]
                    elif isinstance(m, Gauge) and m.merge == "max":
                        acc[labels] = max(acc[labels], v)
                    elif isinstance(m, Gauge) and m.merge == "min":
                        acc[labels] = min(acc[labels], v)
                    else:
                        acc[labels] = acc[labels] + v
            out[m.name] = acc
        return out

    def families(self, values: dict[str, dict[Labels, Any]] | None = None) -> Iterator[Any]:
        values = self.snapshot() if values is None else values
        for m in self._all:
            vals = values.get(m.name, {})
            labelnames = list(m.labelnames)
            if isinstance(m, Counter):
                fam = CounterMetricFamily(m.name[: -len("_total")], m.help, labels=labelnames)
                for labels, v in sorted(vals.items()):
                    fam.add_metric(list(labels), v)
            elif isinstance(m, Gauge):
                fam = GaugeMetricFamily(m.name, m.help, labels=labelnames)
                for labels, v in sorted(vals.items()):
                    fam.add_metric(list(labels), v)
            else:
                fam = HistogramMetricFamily(m.name, m.help, labels=labelnames)
                for labels, row in sorted(vals.items()):
                    cumulative, buckets = 0, []
                    for le, n in zip(m.buckets + (float("inf"),), row[:-1]):
                        cumulative += n
                        buckets.append((_fmt_le(le), cumulative))
                    fam.add_metric(list(labels), buckets, row[-1])
            yield fam


def _fmt_le(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)


class MetricsCollector:
    """prometheus_client collector over a `Metrics` (or a supervisor's merged worker values)."""

    def __init__(self, metrics: Metrics,
                 values: Callable[[], dict[str, dict[Labels, Any]]] | None = None) -> None:
        self.metrics = metrics
        self.values = values

    def collect(self) -> Iterator[Any]:
        yield from self.metrics.families(self.values() if self.values else None)


def make_registry(metrics: Metrics,
                  values: Callable[[], dict[str, dict[Labels, Any]]] | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, values))
    return registry
