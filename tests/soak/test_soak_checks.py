"""The soak harness's verdict (soak/run.py `analyse`) must catch what it claims to catch: a test
of the checker itself, so that `make soak` passing means something. Pure data, no processes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_PATH = Path(__file__).resolve().parents[2] / "soak" / "run.py"
_spec = importlib.util.spec_from_file_location("portcullis_soak_run", _PATH)
soak = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = soak
_spec.loader.exec_module(soak)

KIND = {k.name: k for k in soak.KINDS}
P1 = ("P1", frozenset())
P2 = ("P2", frozenset())
P1_REVOKED = ("P1", frozenset({soak.REVOKED}))


def rev(n, content, t_sent, t_ack=None):
    return soak.Revision(n, content, t_sent, t_sent if t_ack is None else t_ack, f"rev {n}")


def run_of(results, revisions, window=1.0):
    return SimpleNamespace(failures=[], revisions=revisions, results=results, window=window,
                           t_start=0.0)


def upstream_of(seen=None):
    return SimpleNamespace(seen=seen or {}, unknown=0, duplicates=0)


def result(rid, kind, t0, status, error=None):
    return soak.Result(rid, KIND[kind], 1, t0, t0 + 0.01, status, error)


def audit(rid, status, revision):
    return {"type": "decision", "request_id": rid, "status": status,
            "policy_revision": f"demo@{revision}"}


def seen(kind, subject=None):
    return soak.Seen("GET", "/", soak.IDS[KIND[kind].who], subject)


REVS = [rev(1, P1, 0.0), rev(2, P2, 10.0)]


def test_a_clean_run_passes():
    rs = [result("soak-1", "frontend-read", 1.0, 200), result("soak-2", "intruder", 2.0, 403)]
    s = run_of(rs, REVS)
    out = soak.analyse(s, [audit("soak-1", 200, 1), audit("soak-2", 403, 1)],
                       upstream_of({"soak-1": seen("frontend-read")}))
    assert s.failures == [] and out["answered"] == 2 and out["audit_decisions"] == 2


def test_a_refused_request_that_reached_the_upstream_is_authorised_by_mistake():
    """Even when the client saw 403, the upstream's own record is what counts."""
    rs = [result("soak-1", "intruder", 2.0, 403)]
    s = run_of(rs, REVS)
    soak.analyse(s, [audit("soak-1", 403, 1)], upstream_of({"soak-1": seen("intruder")}))
    assert any(f.startswith("authorised_by_mistake") for f in s.failures)


def test_a_200_where_only_a_refusal_was_acceptable_is_authorised_by_mistake():
    rs = [result("soak-1", "batch-admin", 2.0, 200)]
    s = run_of(rs, REVS)
    soak.analyse(s, [audit("soak-1", 200, 1)], upstream_of({"soak-1": seen("batch-admin")}))
    assert any(f.startswith("authorised_by_mistake") for f in s.failures)


def test_a_refused_authorised_request_is_a_failure():
    rs = [result("soak-1", "frontend-read", 2.0, 403, "workload_not_allowed")]
    s = run_of(rs, REVS)
    soak.analyse(s, [audit("soak-1", 403, 1)], upstream_of())
    assert any(f.startswith("failed_authorised") for f in s.failures)


def test_no_answer_for_an_authorised_request_is_a_failure():
    rs = [result("soak-1", "frontend-read", 2.0, None, "ConnectionResetError")]
    s = run_of(rs, REVS)
    soak.analyse(s, [], upstream_of())
    assert any(f.startswith("failed_authorised") for f in s.failures)


def test_both_outcomes_are_accepted_only_inside_the_convergence_window():
    """batch-report is 403 under P1 and 200 under P2 (sent at t=10, window 1 s)."""
    inside = [result("soak-1", "batch-report", 10.5, 403)]
    s = run_of(inside, REVS)
    soak.analyse(s, [audit("soak-1", 403, 1)], upstream_of())
    assert s.failures == []
    late = [result("soak-2", "batch-report", 12.0, 403)]
    s = run_of(late, REVS)
    soak.analyse(s, [audit("soak-2", 403, 1)], upstream_of())
    assert any(f.startswith("failed_authorised") for f in s.failures)
    assert any(f.startswith("decided_by_stale_revision") for f in s.failures)


def test_the_revoked_workload_is_refused_after_the_revocation():
    revs = [rev(1, P1, 0.0), rev(2, P1_REVOKED, 10.0)]
    rs = [result("soak-1", "reporting", 15.0, 200)]
    s = run_of(rs, revs)
    soak.analyse(s, [audit("soak-1", 200, 1)], upstream_of({"soak-1": seen("reporting")}))
    assert any(f.startswith("authorised_by_mistake") for f in s.failures)


@pytest.mark.parametrize("records, category", [
    ([], "audit_missing"),
    ([audit("soak-1", 200, 1), audit("soak-1", 200, 1)], "audit_duplicate"),
    ([audit("soak-1", 403, 1)], "audit_status_mismatch"),
    ([audit("soak-1", 200, 7)], "audit_unknown_revision"),
])
def test_audit_records_must_match_answers_exactly_once(records, category):
    rs = [result("soak-1", "frontend-read", 2.0, 200)]
    s = run_of(rs, REVS)
    soak.analyse(s, records, upstream_of({"soak-1": seen("frontend-read")}))
    assert any(f.startswith(category) for f in s.failures), s.failures


def test_an_audit_record_for_a_request_nobody_sent_fails_the_count():
    rs = [result("soak-1", "frontend-read", 2.0, 200)]
    s = run_of(rs, REVS)
    extra = {"type": "decision", "request_id": "someone-else", "status": 200}
    soak.analyse(s, [audit("soak-1", 200, 1), extra], upstream_of({"soak-1": seen("frontend-read")}))
    assert any(f.startswith("audit decision records") for f in s.failures)


def test_the_wrong_identity_at_the_upstream_is_a_failure():
    rs = [result("soak-1", "agent-dpop", 2.0, 200)]
    s = run_of(rs, REVS)
    soak.analyse(s, [audit("soak-1", 200, 1)],
                 upstream_of({"soak-1": seen("agent-dpop", subject="mallory")}))
    assert any(f.startswith("wrong_identity_upstream") for f in s.failures)


def test_requests_at_the_upstream_that_no_client_sent_are_a_failure():
    s = run_of([], REVS)
    soak.analyse(s, [], upstream_of({"soak-9": seen("frontend-read")}))
    assert any(f.startswith("unexplained_upstream_requests") for f in s.failures)
