"""proxy.core.policy with CEL `when` conditions and actions: evaluation table
(tests/vectors/policy_when.yaml), load-time problems with their exact paths
(tests/vectors/policy_when_errors.yaml), and properties (the indexed evaluator agrees with the
rule-by-rule reference and never raises, whatever the parameters)."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.model import Outcome, RequestContext, SpiffeId, TokenClaims, Verdict
from proxy.core.policy import compile_policy, evaluate, evaluate_linear, extract_params
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import ConfigError
from tests.core.test_policy_tokens import make_token, tokens

VECTORS = Path(__file__).parent.parent / "vectors"
CASES_DOC = yaml.safe_load((VECTORS / "policy_when.yaml").read_text())
ERRORS_DOC = yaml.safe_load((VECTORS / "policy_when_errors.yaml").read_text())


def _outcome(d: dict[str, Any]) -> Outcome:
    return Outcome(d["effect"], d["code"], d["rule"], tuple(d.get("acr_values") or ()),
                   d.get("max_age_s"))


def context(policy: Any, req: dict[str, Any], token: TokenClaims | None) -> RequestContext:
    """A RequestContext as the pipeline builds it, action and parameters included."""
    sid = parse_spiffe_id(req["workload"])
    method, path, query = req["method"], req["path"], req.get("query") or ""
    ctx = RequestContext(sid, str(sid), method, path, query, token)
    spec = policy.action_for(method, path)
    if spec is not None:
        body = req.get("body")
        params = extract_params(spec, spec.captures(path), query,
                                None if body is None else body.encode())
        ctx = ctx._replace(action=spec.name, params=params)
    return ctx


CASES = [pytest.param(suite, case, id=f"{suite['name']}::{case['id']}")
         for suite in CASES_DOC["suites"] for case in suite["cases"]]


@pytest.mark.parametrize(("suite", "case"), CASES)
def test_when_case(suite: dict, case: dict) -> None:
    policy = compile_policy(suite["policy"])
    req = {**suite.get("request", {}),
           **{k: v for k, v in case.items()
              if k in ("workload", "method", "path", "query", "body", "now")}}
    if "token" in case and case["token"] is None:
        token = None
    elif "token" in suite or "token" in case:
        token = make_token({**(suite.get("token") or {}), **(case.get("token") or {})})
    else:
        token = None
    c = context(policy, req, token)
    now = req.get("now")
    expected = Verdict(_outcome(case), _outcome(case["shadow"]) if "shadow" in case else None)
    assert evaluate(policy, c, now=now) == expected
    assert evaluate_linear(policy, c, now=now) == expected


# ---- load-time errors ---------------------------------------------------------------------------


def _error_doc(case: dict) -> dict:
    rule = copy.deepcopy(ERRORS_DOC["base_rule"])
    rule.update(copy.deepcopy(case.get("rule", {})))
    doc: dict[str, Any] = {"version": 1, "revision": "r1",
                           "actions": copy.deepcopy(ERRORS_DOC["base_actions"]), "rules": [rule]}
    for k, v in copy.deepcopy(case.get("doc", {})).items():
        if v is None:
            del doc[k]
        else:
            doc[k] = v
    return doc


def problems_of(doc: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        compile_policy(doc)
    return [(p.path, p.message) for p in info.value.problems]


@pytest.mark.parametrize("case", ERRORS_DOC["cases"], ids=[c["id"] for c in ERRORS_DOC["cases"]])
def test_when_and_actions_compile_error(case: dict) -> None:
    problems = problems_of(_error_doc(case))
    assert any(p == case["path"] and case["message"] in m for p, m in problems), problems


def test_base_documents_of_error_table_compile() -> None:
    policy = compile_policy(_error_doc({}))
    assert [a.name for a in policy.actions] == ["invoice.approve"]
    compile_policy(_error_doc({"rule": {"to": [{"actions": ["invoice.approve"]}],
                                        "when": "action.params.amount > 1.0"}}))


def test_every_problem_is_reported_at_once() -> None:
    doc = {
        "version": 1, "revision": "r",
        "actions": [{"name": "a", "paths": ["/a/{id}"],
                     "params": {"id": {"from": "path"}, "n": {"from": "body"}}},
                    {"name": "a", "paths": ["/b"]}],
        "rules": [
            {"id": "x", "effect": "allow", "from": {"workloads": ["spiffe://e.org/w"]},
             "to": [{"actions": ["zzz"]}, {"paths": ["/x"]}], "when": "action.params.nope == 1"},
            {"id": "v", "effect": "allow", "from": {"workloads": ["spiffe://e.org/w"]},
             "to": [{"actions": ["a"]}], "when": "action.params.n == 1"},  # a is broken: later
            {"id": "y", "effect": "deny", "from": {"workloads": ["spiffe://e.org/w"]},
             "to": [{"paths": ["/y"]}], "when": "token.sub"},
            {"id": "z", "effect": "allow", "from": {"workloads": ["spiffe://e.org/w"]},
             "to": [{"paths": ["/z"]}], "when": "(("},
        ],
    }
    assert [p for p, _ in problems_of(doc)] == [
        "actions[0].params.n.pointer",
        "actions[1].name",
        "rules[0].to[0].actions[0]",
        "rules[0].when",
        "rules[2].when",
        "rules[3].when",
    ]


def test_compiled_when_and_actions() -> None:
    policy = compile_policy(_error_doc({"rule": {
        "to": [{"actions": ["invoice.approve"]}, {"methods": ["GET"], "paths": ["/inv/{n}"]}],
        "when": "action.params.amount > 1.0 || request.params.n == 'x'"}}))
    rule = policy.rules[0]
    assert rule.actions == frozenset({"invoice.approve"})
    assert rule.when is not None and rule.when.source.startswith("action.params.amount")
    assert [r.text for r in rule.when.condition.refs] == ["action.params.amount",
                                                          "request.params.n"]
    spec = policy.actions[0]
    assert (spec.name, spec.index, spec.needs_body, spec.max_body_bytes) == \
        ("invoice.approve", 0, True, 65536)
    assert [(p.name, p.source, p.key, p.type, p.required, p.pointer) for p in spec.params] == [
        ("invoice_id", "path", "invoice_id", "string", True, ()),
        ("amount", "body", "/amount", "number", True, ("amount",)),
    ]


def test_action_rule_matches_only_its_action() -> None:
    policy = compile_policy(_error_doc({"rule": {"to": [{"actions": ["invoice.approve"]}]}}))
    sid = parse_spiffe_id("spiffe://example.org/agent")
    base = RequestContext(sid, str(sid), "POST", "/api/invoices/INV-1/approve")
    assert evaluate(policy, base).outcome.code == "no_matching_rule"  # no action set
    ok = base._replace(action="invoice.approve",
                       params=MappingProxyType({"invoice_id": "INV-1", "amount": Decimal(1)}))
    assert evaluate(policy, ok).outcome == Outcome("allow", "allowed", "r")
    assert evaluate(policy, ok._replace(action="invoice.reject")).outcome.effect == "deny"
    # the evaluator trusts ctx.action: it is the pipeline's job to set it from action_for
    assert evaluate(policy, ok._replace(path="/elsewhere")).outcome.effect == "allow"


def test_authorization_details_read_action_parameters() -> None:
    doc = _error_doc({"rule": {
        "from": {"workloads": ["spiffe://example.org/agent"],
                 "subjects": [{"issuer": "https://idp", "sub": "*"}]},
        "to": [{"actions": ["invoice.approve"]}],
        "require": {"authorization_details": {
            "type": "invoice_approval", "match": {"invoice_id": "invoice_id"},
            "bounds": {"amount": {"gt": 0, "le": ["max_amount", 5000]}}}}}})
    policy = compile_policy(doc)

    def decide(body: str, max_amount: Any, invoice: str = "INV-1") -> str:
        token = make_token({"iss": "https://idp", "sub": "alice", "details": [
            {"type": "invoice_approval", "invoice_id": invoice, "max_amount": max_amount}]})
        c = context(policy, {"workload": "spiffe://example.org/agent", "method": "POST",
                             "path": "/api/invoices/INV-1/approve", "body": body}, token)
        verdict = evaluate(policy, c)
        assert verdict == evaluate_linear(policy, c)
        return verdict.outcome.effect

    assert decide('{"amount": 4800}', 5000) == "allow"
    assert decide('{"amount": 4800.10}', 4800.1) == "allow"   # exact decimals, no float drift
    assert decide('{"amount": 4800.11}', "4800.10") == "deny"
    assert decide('{"amount": 5000.01}', 10000) == "deny"      # the literal bound
    assert decide('{"amount": 0}', 10000) == "deny"
    assert decide('{"amount": 4800}', 5000, invoice="INV-2") == "deny"


# ---- properties ---------------------------------------------------------------------------------

_CONDITIONS = [
    "action.params.amount <= 5000.0",
    "has(action.params.note) && action.params.note.startsWith('x')",
    "action.params.note == 'x' || action.params.amount > 10.0",
    "token.claims.department == action.params.department",
    "request.query.debug == '1'",
    "token.present && token.sub != ''",
    "action.name == 'pay' && size(action.params) > 1",
    "now.getHours() < 12",
    "action.params.meta.x == 1",
    "token.authorization_details.exists(d, d.type == 'invoice_approval')",
]
_PARAMS = st.dictionaries(
    st.sampled_from(["amount", "note", "department", "meta", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.text(max_size=6),
              st.decimals(allow_nan=True, allow_infinity=True), st.floats(),
              st.lists(st.integers(), max_size=2),
              st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    max_size=5)


@st.composite
def when_policies(draw: Any) -> dict:
    rules = []
    for i in range(draw(st.integers(1, 6))):
        to: list[dict] = []
        if draw(st.booleans()):
            to.append({"actions": [draw(st.sampled_from(["pay", "refund"]))]})
        if not to or draw(st.booleans()):
            to.append({"paths": [draw(st.sampled_from(["/pay/{id}", "/pay/**", "/**"]))]})
        rule: dict[str, Any] = {"id": f"r{i}", "effect": draw(st.sampled_from(["allow", "deny"])),
                                "shadow": draw(st.booleans()),
                                "from": {"workloads": ["spiffe://example.org/**"]}, "to": to}
        if draw(st.integers(0, 3)):
            rule["when"] = draw(st.sampled_from(_CONDITIONS))
        rules.append(rule)
    actions = [{"name": n, "paths": [f"/{n}/{{id}}"],
                "params": {"id": {"from": "path"},
                           "amount": {"from": "body", "pointer": "/amount", "type": "number"},
                           "note": {"from": "query", "required": False},
                           "department": {"from": "query", "required": False},
                           "meta": {"from": "body", "pointer": "/meta", "required": False}}}
               for n in ("pay", "refund")]
    return {"version": 1, "revision": "p", "actions": actions, "rules": rules}


_SETTINGS = settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much,
                                                              HealthCheck.too_slow])


@_SETTINGS
@given(when_policies(), st.sampled_from([None, "pay", "refund", "other"]), _PARAMS,
       st.sampled_from(["/pay/1", "/refund/x", "/", "/pay", "x"]),
       st.one_of(st.sampled_from(["", "debug=1", "debug=1&debug=2", "x=%zz"]),
                 st.text(max_size=12)),
       tokens(), st.one_of(st.none(), st.floats()))
def test_evaluate_with_conditions_never_raises_and_matches_the_reference(
        doc: dict, action: str | None, params: dict, path: str, query: str,
        token: TokenClaims | None, now: float | None) -> None:
    policy = compile_policy(doc)
    sid = SpiffeId("example.org", "/agent")
    ctx = RequestContext(sid, str(sid), "POST", path, query, token, None, action,
                         MappingProxyType(params))
    verdict = evaluate(policy, ctx, now=now)
    assert verdict == evaluate_linear(policy, ctx, now=now)
    if verdict.outcome.effect == "allow":
        rule = policy.rule(verdict.outcome.rule_id)
        assert rule is not None and rule.effect == "allow" and not rule.shadow


@_SETTINGS
@given(when_policies(), _PARAMS, tokens())
def test_a_deny_rule_whose_condition_errors_denies(doc: dict, params: dict,
                                                   token: TokenClaims | None) -> None:
    doc["rules"].append({"id": "broken", "effect": "deny",
                         "from": {"workloads": ["spiffe://example.org/**"]},
                         "to": [{"paths": ["/**"]}],
                         "when": "action.params.meta.missing.deeper == 1"})
    policy = compile_policy(doc)
    sid = SpiffeId("example.org", "/agent")
    ctx = RequestContext(sid, str(sid), "POST", "/pay/1", "", token, None, "pay",
                         MappingProxyType({k: v for k, v in params.items() if k != "meta"}))
    assert evaluate(policy, ctx).outcome.effect == "deny"


def test_the_cel_runtime_is_loaded_only_by_a_policy_with_conditions() -> None:
    # ~14 MiB of RSS per process (bench/README.md, goal 5): a policy without `when` never pays it
    import subprocess
    import sys
    probe = """
import sys
from proxy.config import load_config  # noqa: F401 - everything a worker imports
from proxy.runtime.server import Worker  # noqa: F401
from proxy.core.policy import compile_policy
rule = {"id": "r", "effect": "allow", "from": {"workloads": ["spiffe://example.org/a"]},
        "to": [{"paths": ["/"]}]}
compile_policy({"version": 1, "revision": "r", "rules": [rule]})
print("cel" in sys.modules)
compile_policy({"version": 1, "revision": "r", "rules": [{**rule, "when": "request.method == 'GET'"}]})
print("cel" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out == ["False", "True"]


def _rule(i: int, when: str, path: str = "/a/{x}") -> dict:
    return {"id": f"r{i}", "effect": "allow", "from": {"workloads": ["spiffe://example.org/a"]},
            "to": [{"paths": [path]}], "when": when}


def test_rules_repeating_a_condition_share_one_compiled_program() -> None:
    same = "request.params.x.startsWith('a')"
    policy = compile_policy({"version": 1, "revision": "r", "rules": [
        _rule(0, same), _rule(1, same), _rule(2, same, "/b/{y}/{x}"),
        _rule(3, "request.params.x.startsWith('b')")]})
    c = [r.when.condition for r in policy.rules]
    assert c[0] is c[1]  # same text, same variables
    assert c[2] is not c[0]  # another set of template captures: another environment
    assert c[3] is not c[0]
    again = compile_policy({"version": 1, "revision": "r2", "rules": [_rule(0, same)]})
    assert again.rules[0].when.condition is c[0]  # a later revision keeps it compiled
    # each rule still decides on its own captures
    ctx = RequestContext(parse_spiffe_id("spiffe://example.org/a"), "spiffe://example.org/a",
                         "GET", "/b/zz/abc", MappingProxyType({}), None)
    assert evaluate(policy, ctx).outcome.rule_id == "r2"


def test_a_repeated_bad_condition_is_reported_for_every_rule() -> None:
    bad = "request.params.nope == 'a'"
    with pytest.raises(ConfigError) as info:
        compile_policy({"version": 1, "revision": "r", "rules": [_rule(0, bad), _rule(1, bad)]})
    paths = [p.path for p in info.value.problems]
    assert paths == ["rules[0].when", "rules[1].when"], paths
