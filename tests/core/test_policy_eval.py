"""proxy.core.policy.evaluate: table from tests/vectors/policy_cases.yaml, plus properties.

The indexed `evaluate` is checked against `evaluate_linear` (the rule-by-rule reference) on every
table case and on generated policies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.model import Outcome, RequestContext, SpiffeId, Verdict
from proxy.core.policy import compile_policy, evaluate, evaluate_linear
from proxy.core.spiffe import parse_spiffe_id

VECTORS = yaml.safe_load(
    (Path(__file__).parent.parent / "vectors" / "policy_cases.yaml").read_text())

CASES = [
    pytest.param(suite, case, id=f"{suite['name']}::{case['id']}")
    for suite in VECTORS["suites"]
    for case in suite["cases"]
]


def ctx(workload: str, method: str, path: str) -> RequestContext:
    sid = parse_spiffe_id(workload)
    return RequestContext(workload=sid, workload_uri=str(sid), method=method, path=path)


def _outcome(d: dict[str, Any]) -> Outcome:
    return Outcome(d["effect"], d["code"], d["rule"])


@pytest.mark.parametrize(("suite", "case"), CASES)
def test_policy_case(suite: dict, case: dict) -> None:
    policy = compile_policy(suite["policy"])
    c = ctx(case["workload"], case["method"], case["path"])
    shadow = _outcome(case["shadow"]) if "shadow" in case else None
    expected = Verdict(_outcome(case), shadow)
    assert evaluate(policy, c) == expected
    assert evaluate_linear(policy, c) == expected


def test_revision_and_trust_domains_are_exposed() -> None:
    policy = compile_policy(VECTORS["suites"][1]["policy"])
    assert policy.revision == "r1"
    assert policy.trust_domains == frozenset({"example.org", "partner.org"})
    assert [r.id for r in policy.rules] == ["any-namespace-batch", "whole-partner-domain",
                                            "team-subtree"]


def test_trust_domain_id_is_matched_only_by_itself_or_rest() -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [
        {"id": "td", "effect": "allow", "from": {"workloads": ["spiffe://example.org"]},
         "to": [{"paths": ["/a"]}]},
    ]})
    assert evaluate(policy, ctx("spiffe://example.org", "GET", "/a")).outcome.effect == "allow"
    assert evaluate(policy, ctx("spiffe://example.org/x", "GET", "/a")).outcome.effect == "deny"


# ---- properties ---------------------------------------------------------------------------------

_WORKLOAD_PATTERNS = [
    "spiffe://example.org/ns/a/sa/web", "spiffe://example.org/ns/*/sa/web",
    "spiffe://example.org/ns/a/**", "spiffe://example.org/**", "spiffe://other.org/**",
    "spiffe://example.org", "spiffe://other.org/x",
]
_TEMPLATES = [
    "/", "/a", "/a/", "/a/b", "/a/{id}", "/a/*/c", "/a/**", "/**", "/b/{x}/{y}", "/a/b/**",
    "/%C3%A9", "/~",
]
_METHODS = [None, ["GET"], ["GET", "HEAD"], ["POST"], ["DELETE", "GET"]]

_WORKLOADS = [
    "spiffe://example.org/ns/a/sa/web", "spiffe://example.org/ns/b/sa/web",
    "spiffe://example.org/ns/a", "spiffe://example.org", "spiffe://example.org/x/y/z",
    "spiffe://other.org", "spiffe://other.org/x", "spiffe://third.org/ns/a/sa/web",
]
_PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/x/c", "/a/b/c/d", "/b/1/2", "/b/1", "/%C3%A9",
          "/~", "/c", "a", ""]


@st.composite
def policies(draw: Any, effects: tuple[str, ...] = ("allow", "deny")) -> dict:
    n = draw(st.integers(1, 8))
    rules = []
    for i in range(n):
        route: dict[str, Any] = {"paths": draw(st.lists(st.sampled_from(_TEMPLATES), min_size=1,
                                                        max_size=3))}
        methods = draw(st.sampled_from(_METHODS))
        if methods is not None:
            route["methods"] = methods
        rules.append({
            "id": f"r{i}",
            "effect": draw(st.sampled_from(effects)),
            "shadow": draw(st.booleans()),
            "from": {"workloads": draw(st.lists(st.sampled_from(_WORKLOAD_PATTERNS), min_size=1,
                                                max_size=3))},
            "to": [route],
        })
    return {"version": 1, "revision": "p", "rules": rules}


_SEGMENT_TEXT = st.text(max_size=12)
_ANY_CONTEXT = st.builds(
    RequestContext,
    workload=st.builds(SpiffeId,  # also malformed IDs: evaluate must not trust them
                       trust_domain=st.sampled_from(["example.org", "other.org", "", "x"]),
                       path=st.one_of(st.sampled_from(["", "/ns/a/sa/web", "/x"]), _SEGMENT_TEXT)),
    workload_uri=st.text(max_size=20),
    method=st.one_of(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "get"]),
                     st.text(max_size=8)),
    path=st.one_of(st.sampled_from(_PATHS), st.text(max_size=20)),
    query=st.just(""), token=st.none(), binding=st.none(), action=st.none(),
    params=st.just({}),
)


def _table_context(workload: str, method: str, path: str) -> RequestContext:
    return ctx(workload, method, path)


_TABLE_CONTEXT = st.builds(_table_context, st.sampled_from(_WORKLOADS),
                           st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT"]),
                           st.sampled_from(_PATHS))


@settings(max_examples=300)
@given(policies(), st.one_of(_TABLE_CONTEXT, _ANY_CONTEXT))
def test_evaluate_matches_the_reference_and_never_raises(doc: dict, c: RequestContext) -> None:
    policy = compile_policy(doc)
    verdict = evaluate(policy, c)
    assert verdict == evaluate_linear(policy, c)
    assert verdict.outcome.effect in ("allow", "deny")
    if verdict.outcome.effect == "allow":
        rule = policy.rule(verdict.outcome.rule_id)
        assert rule is not None and rule.effect == "allow" and not rule.shadow


@settings(max_examples=200)
@given(policies(effects=("deny",)), st.one_of(_TABLE_CONTEXT, _ANY_CONTEXT))
def test_default_deny_without_allow_rules(doc: dict, c: RequestContext) -> None:
    policy = compile_policy(doc)
    verdict = evaluate(policy, c)
    assert verdict.outcome.effect == "deny"
    assert verdict.shadow is None or verdict.shadow.effect == "deny"


@settings(max_examples=200)
@given(policies(effects=("allow",)), st.one_of(_TABLE_CONTEXT, _ANY_CONTEXT))
def test_shadow_only_allow_rules_never_allow(doc: dict, c: RequestContext) -> None:
    for rule in doc["rules"]:
        rule["shadow"] = True
    verdict = evaluate(compile_policy(doc), c)
    assert verdict.outcome == Outcome("deny", "no_matching_rule", None)


def test_malformed_workload_path_matches_nothing() -> None:
    """A SpiffeId built without the parser (path not starting with "/") never matches, not even
    `spiffe://td/**` or the trust domain ID (found by the property test above)."""
    policy = compile_policy({"version": 1, "revision": "r", "rules": [
        {"id": "td", "effect": "allow",
         "from": {"workloads": ["spiffe://example.org", "spiffe://example.org/**"]},
         "to": [{"paths": ["/**"]}]},
    ]})
    bad = RequestContext(SpiffeId("example.org", "0"), "spiffe://example.org0", "GET", "/")
    assert evaluate(policy, bad) == Verdict(Outcome("deny", "no_matching_rule", None))
    assert evaluate_linear(policy, bad) == evaluate(policy, bad)
