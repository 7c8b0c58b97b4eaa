"""proxy.core.policy.explain: the per-rule trace agrees with evaluate and names why each rule
matched or not (to, workload, token, require, when)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.model import RequestContext
from proxy.core.policy import Check, compile_policy, evaluate, explain, extract_params
from proxy.core.spiffe import parse_spiffe_id
from tests.core.test_policy_tokens import make_token

EXAMPLE = Path(__file__).parent.parent.parent / "config" / "policy.example.yaml"
AGENT = "spiffe://example.org/agents/expense-assistant"
POLICY = compile_policy(yaml.safe_load(EXAMPLE.read_text()), source=str(EXAMPLE))


def agent_request(amount: str, **token: Any) -> RequestContext:
    path = "/api/invoices/INV-8831/approve"
    spec = POLICY.action_for("POST", path)
    params = extract_params(spec, spec.captures(path), "department=finance",
                            f'{{"amount": {amount}}}'.encode())
    tok = make_token({"iss": "https://idp.example.org", "sub": "alice", "actors": [AGENT],
                      "acr": "urn:example:pwd", "claims": {"department": "finance"},
                      "details": [{"type": "invoice_approval", "invoice_id": "INV-8831",
                                   "max_amount": 20000}], **token})
    sid = parse_spiffe_id(AGENT)
    return RequestContext(sid, str(sid), "POST", path, "department=finance", tok, None,
                          spec.name, params)


def checks(expl: Any, rule_id: str) -> dict[str, Check]:
    trace = next(r for r in expl.rules if r.id == rule_id)
    return {c.name: c for c in trace.checks}


def test_step_up_trace() -> None:
    ctx = agent_request("7000")
    expl = explain(POLICY, ctx, now=1.0)
    assert expl.verdict == evaluate(POLICY, ctx, now=1.0)
    assert expl.verdict.outcome.effect == "step_up"
    ids = [POLICY.rules[i].id for i in expl.candidates]
    assert ids == ["expense-agent-approves-invoice", "expense-agent-approves-large-invoice",
                   "invoice-over-10000-needs-two-approvals"]
    results = {r.id: (r.candidate, r.result) for r in expl.rules}
    assert results["expense-agent-approves-invoice"] == (True, "no")
    assert results["expense-agent-approves-large-invoice"] == (True, "step_up")
    assert results["invoice-over-10000-needs-two-approvals"] == (True, "no")
    assert results["frontend-reads-api"] == (False, "no")

    small = checks(expl, "expense-agent-approves-invoice")
    assert small["to"] == Check("to", True, "action invoice.approve")
    assert small["workload"].ok and small["token"].ok and small["require"].ok
    assert small["token"].detail == "subjects, actors (current)"
    assert small["when"].ok is False and small["when"].detail.startswith("false: ")
    large = checks(expl, "expense-agent-approves-large-invoice")
    assert large["require"] == Check("require", False, "step-up: acr_values urn:example:mfa")
    assert large["when"].ok is True
    frontend = checks(expl, "frontend-reads-api")
    assert frontend["to"].ok is False and "GET,HEAD /api/**" in frontend["to"].detail
    assert frontend["workload"].ok is False


@pytest.mark.parametrize(("token", "check", "fragment"), [
    ({"iss": "https://other"}, "token", "fails subjects"),
    ({"actors": ["spiffe://example.org/agents/x"]}, "token", "fails actors (current)"),
    ({"actors": [AGENT, "spiffe://example.org/agents/x"]}, "require",
     "fails max_delegation_depth 1"),
    ({"details": []}, "require", "fails authorization_details invoice_approval"),
    ({"claims": {"department": "sales"}}, "when", "false: "),
])
def test_failing_part_is_named(token: dict, check: str, fragment: str) -> None:
    expl = explain(POLICY, agent_request("4800", **token))
    assert expl.verdict.outcome.code == "no_matching_rule"
    got = checks(expl, "expense-agent-approves-invoice")[check]
    assert got.ok is False and fragment in got.detail


def test_condition_errors_are_explained_with_their_consequence() -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [
        {"id": "allow-x", "effect": "allow", "from": {"workloads": ["spiffe://e.org/a"]},
         "to": [{"paths": ["/x"]}], "when": "token.claims.level > 1"},
        {"id": "deny-x", "effect": "deny", "from": {"workloads": ["spiffe://e.org/a"]},
         "to": [{"paths": ["/x"]}], "when": "token.claims.blocked == true"},
    ]})
    sid = parse_spiffe_id("spiffe://e.org/a")
    expl = explain(policy, RequestContext(sid, str(sid), "GET", "/x"))
    allow, deny = (checks(expl, r) for r in ("allow-x", "deny-x"))
    assert allow["when"].ok is False
    assert allow["when"].detail.startswith("error: no value for token.claims.level; the allow "
                                           "rule does not match (fail closed)")
    assert deny["when"].ok is True and "the deny rule matches (fail closed)" in deny["when"].detail
    assert expl.verdict.outcome.rule_id == "deny-x"
    assert [r.result for r in expl.rules] == ["no", "match"]


def test_rules_without_token_parts_show_only_what_they_have() -> None:
    sid = parse_spiffe_id("spiffe://example.org/ns/demo/sa/frontend")
    expl = explain(POLICY, RequestContext(sid, str(sid), "GET", "/api/items"))
    assert expl.verdict.outcome.rule_id == "frontend-reads-api"
    trace = next(r for r in expl.rules if r.id == "frontend-reads-api")
    assert [c.name for c in trace.checks] == ["to", "workload"]
    assert trace.checks[0] == Check("to", True, "GET,HEAD /api/**")
    no_token = checks(expl, "expense-agent-approves-invoice")
    assert no_token["token"] == Check("token", False, "no token (the rule has token selectors)")
    assert no_token["to"].ok is False and "action invoice.approve" in no_token["to"].detail
