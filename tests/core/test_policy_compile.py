"""proxy.core.policy.compile_policy: every load-time rule, each with the path of its problem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.policy import compile_policy, evaluate
from proxy.core.model import RequestContext
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent.parent / "config" / "policy.example.yaml"


def good_rule(**over: Any) -> dict:
    rule = {
        "id": "r",
        "effect": "allow",
        "from": {"workloads": ["spiffe://example.org/ns/default/sa/frontend"]},
        "to": [{"methods": ["GET"], "paths": ["/api/items/{id}"]}],
    }
    rule.update(over)
    return rule


def good_doc(*rules: dict) -> dict:
    return {"version": 1, "revision": "r1", "rules": list(rules) or [good_rule()]}


def problems_of(doc: Any, **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        compile_policy(doc, **kw)
    return [(p.path, p.message) for p in info.value.problems]


def route(**over: Any) -> dict:
    r: dict[str, Any] = {"paths": ["/a"]}
    r.update(over)
    return r


# (id, document, expected problem path, fragment of its message)
ERRORS = [
    ("not-a-mapping", ["rules"], "", "must be a mapping"),
    ("unknown-top-key", {**good_doc(), "extra": 1}, "extra", "unknown key"),
    ("missing-version", {"revision": "r", "rules": [good_rule()]}, "version", "is required"),
    ("version-2", {**good_doc(), "version": 2}, "version", "unsupported policy version"),
    ("version-bool", {**good_doc(), "version": True}, "version", "unsupported policy version"),
    ("version-string", {**good_doc(), "version": "1"}, "version", "unsupported policy version"),
    ("revision-not-string", {**good_doc(), "revision": 3}, "revision", "non-empty string"),
    ("revision-empty", {**good_doc(), "revision": ""}, "revision", "non-empty string"),
    ("missing-rules", {"version": 1, "revision": "r"}, "rules", "is required"),
    ("empty-rules", {"version": 1, "revision": "r", "rules": []}, "rules", "must not be empty"),
    ("rules-not-list", {"version": 1, "revision": "r", "rules": {}}, "rules", "must be a list"),
    ("rule-not-mapping", good_doc(good_rule(), "x"), "rules[1]", "must be a mapping"),
    ("unknown-rule-key", good_doc(good_rule(unless="true")), "rules[0].unless", "unknown key"),
    ("missing-id", good_doc({k: v for k, v in good_rule().items() if k != "id"}),
     "rules[0].id", "is required"),
    ("bad-id-chars", good_doc(good_rule(id="a b")), "rules[0].id", "must match"),
    ("id-too-long", good_doc(good_rule(id="a" * 129)), "rules[0].id", "must match"),
    ("duplicate-id", good_doc(good_rule(), good_rule()), "rules[1].id", "duplicate rule id 'r'"),
    ("bad-effect", good_doc(good_rule(effect="permit")), "rules[0].effect", "must be one of"),
    ("missing-effect", good_doc({k: v for k, v in good_rule().items() if k != "effect"}),
     "rules[0].effect", "is required"),
    ("shadow-not-bool", good_doc(good_rule(shadow="yes")), "rules[0].shadow", "true or false"),
    ("description-not-string", good_doc(good_rule(description=1)), "rules[0].description",
     "must be a string"),
    ("missing-from", good_doc({k: v for k, v in good_rule().items() if k != "from"}),
     "rules[0].from", "is required"),
    ("unknown-from-key", good_doc(good_rule(**{"from": {"workloads": ["spiffe://e.org/a"],
                                                         "users": []}})),
     "rules[0].from.users", "unknown key"),
    ("no-selector", good_doc(good_rule(**{"from": {}})), "rules[0].from",
     "needs at least one selector"),
    ("empty-workloads", good_doc(good_rule(**{"from": {"workloads": []}})),
     "rules[0].from.workloads", "must not be empty"),
    ("workload-not-string", good_doc(good_rule(**{"from": {"workloads": [7]}})),
     "rules[0].from.workloads[0]", "must be a string"),
    ("workload-no-scheme", good_doc(good_rule(**{"from": {"workloads": ["example.org/a"]}})),
     "rules[0].from.workloads[0]", "must start with spiffe://"),
    ("workload-uppercase-td",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://Example.org/a"]}})),
     "rules[0].from.workloads[0]", "trust domain has characters"),
    ("workload-trailing-slash",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://example.org/a/"]}})),
     "rules[0].from.workloads[0]", "trailing slash"),
    ("workload-rest-not-last",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://example.org/**/sa/x"]}})),
     "rules[0].from.workloads[0]", "'**' is only allowed as the last segment"),
    ("workload-partial-wildcard",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://example.org/sa-*"]}})),
     "rules[0].from.workloads[0]", "whole segment"),
    ("workload-wildcard-trust-domain",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://*.example.org/a"]}})),
     "rules[0].from.workloads[0]", "not allowed in the trust domain"),
    ("workload-percent",
     good_doc(good_rule(**{"from": {"workloads": ["spiffe://example.org/a%20b"]}})),
     "rules[0].from.workloads[0]", "percent-encoding"),
    ("missing-to", good_doc({k: v for k, v in good_rule().items() if k != "to"}),
     "rules[0].to", "is required"),
    ("empty-to", good_doc(good_rule(to=[])), "rules[0].to", "must not be empty"),
    ("to-not-list", good_doc(good_rule(to={"paths": ["/a"]})), "rules[0].to", "must be a list"),
    ("unknown-route-key", good_doc(good_rule(to=[route(host="x")])), "rules[0].to[0].host",
     "unknown key"),
    ("missing-paths", good_doc(good_rule(to=[{"methods": ["GET"]}])), "rules[0].to[0].paths",
     "is required"),
    ("empty-paths", good_doc(good_rule(to=[route(paths=[])])), "rules[0].to[0].paths",
     "must not be empty"),
    ("empty-methods", good_doc(good_rule(to=[route(methods=[])])), "rules[0].to[0].methods",
     "must not be empty"),
    ("lowercase-method", good_doc(good_rule(to=[route(methods=["GET", "get"])])),
     "rules[0].to[0].methods[1]", "must be uppercase"),
    ("invalid-method", good_doc(good_rule(to=[route(methods=["GET POST"])])),
     "rules[0].to[0].methods[0]", "not an HTTP method token"),
    ("template-relative", good_doc(good_rule(to=[route(paths=["/a", "a/b"])])),
     "rules[0].to[0].paths[1]", "must start with '/'"),
    ("template-rest-not-last", good_doc(good_rule(to=[route(paths=["/a/**/b"])])),
     "rules[0].to[0].paths[0]", "'**' is only allowed as the last segment"),
    ("template-partial-wildcard", good_doc(good_rule(to=[route(paths=["/api/v*"])])),
     "rules[0].to[0].paths[0]", "whole segment"),
    ("template-bad-param-name", good_doc(good_rule(to=[route(paths=["/a/{1x}"])])),
     "rules[0].to[0].paths[0]", "bad parameter segment"),
    ("template-partial-param", good_doc(good_rule(to=[route(paths=["/a/x{id}"])])),
     "rules[0].to[0].paths[0]", "bad parameter segment"),
    ("template-empty-param", good_doc(good_rule(to=[route(paths=["/a/{}"])])),
     "rules[0].to[0].paths[0]", "bad parameter segment"),
    ("template-duplicate-param", good_doc(good_rule(to=[route(paths=["/a/{id}/{id}"])])),
     "rules[0].to[0].paths[0]", "used twice"),
    ("template-empty-segment", good_doc(good_rule(to=[route(paths=["/a//b"])])),
     "rules[0].to[0].paths[0]", "empty segment"),
    ("template-dot-segment", good_doc(good_rule(to=[route(paths=["/a/../b"])])),
     "rules[0].to[0].paths[0]", "dot segment"),
    ("template-encoded-unreserved", good_doc(good_rule(to=[route(paths=["/%61dmin"])])),
     "rules[0].to[0].paths[0]", "not canonical (requests arrive as 'admin')"),
    ("template-lowercase-escape", good_doc(good_rule(to=[route(paths=["/caf%c3%a9"])])),
     "rules[0].to[0].paths[0]", "not canonical"),
    ("template-semicolon", good_doc(good_rule(to=[route(paths=["/a;v=1"])])),
     "rules[0].to[0].paths[0]", "';'"),
    ("template-encoded-slash", good_doc(good_rule(to=[route(paths=["/a%2Fb"])])),
     "rules[0].to[0].paths[0]", "forbidden escape"),
    ("template-query", good_doc(good_rule(to=[route(paths=["/a?x=1"])])),
     "rules[0].to[0].paths[0]", "forbidden character '?'"),
    ("template-space", good_doc(good_rule(to=[route(paths=["/a b"])])),
     "rules[0].to[0].paths[0]", "forbidden character ' '"),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_compile_error(doc: Any, path: str, fragment: str) -> None:
    problems = problems_of(doc)
    assert any(p == path and fragment in m for p, m in problems), problems


def test_unknown_trust_domain_can_never_match() -> None:
    doc = good_doc(good_rule(**{"from": {"workloads": ["spiffe://example.org/a",
                                                        "spiffe://partner.org/**"]}}))
    problems = problems_of(doc, known_trust_domains=frozenset({"example.org"}))
    assert problems == [("rules[0].from.workloads[1]",
                         "can never match: no trust bundle for trust domain partner.org")]
    compile_policy(doc, known_trust_domains=frozenset({"example.org", "partner.org"}))


def test_every_problem_is_reported_at_once() -> None:
    doc = {
        "version": 2,
        "rules": [
            good_rule(effect="permit", to=[route(methods=["get"], paths=["/a/**/b", "/ok"])]),
            good_rule(id="r", **{"from": {"workloads": ["spiffe://x.org/**/y"]}}),
            good_rule(id="s"),
            good_rule(id="s"),
        ],
    }
    problems = problems_of(doc, source="policy.yaml")
    paths = [p for p, _ in problems]
    assert paths == [
        "version",
        "revision",
        "rules[0].effect",
        "rules[0].to[0].methods[0]",
        "rules[0].to[0].paths[0]",
        "rules[1].from.workloads[0]",
        "rules[1].id",
        "rules[3].id",
    ]
    with pytest.raises(ConfigError) as info:
        compile_policy(doc, source="policy.yaml")
    assert info.value.source == "policy.yaml"
    assert info.value.render().splitlines()[0].startswith("policy.yaml: version: ")


def test_compile_error_does_not_mutate_input() -> None:
    doc = good_doc(good_rule(effect="permit"))
    before = copy.deepcopy(doc)
    problems_of(doc)
    assert doc == before


@pytest.mark.parametrize(
    ("doc_revision", "argument", "expected"),
    [("doc-rev", None, "doc-rev"), ("doc-rev", "loader-rev", "doc-rev"), (None, "loader-rev",
                                                                           "loader-rev")],
)
def test_revision_source(doc_revision: str | None, argument: str | None, expected: str) -> None:
    doc = good_doc()
    if doc_revision is None:
        del doc["revision"]
    else:
        doc["revision"] = doc_revision
    assert compile_policy(doc, revision=argument).revision == expected


def test_missing_revision_everywhere_is_a_problem() -> None:
    doc = good_doc()
    del doc["revision"]
    assert problems_of(doc) == [("revision", "is required (in the document or from the loader)")]


@pytest.mark.parametrize(
    "template",
    ["/", "/a/", "/api/items/{id}", "/api/*/x", "/static/**", "/**", "/caf%C3%A9", "/~u",
     "/.well-known/x", "/a:b@c!$&'()+,=", "/{a}/{b}/*/**"],
)
def test_valid_templates(template: str) -> None:
    policy = compile_policy(good_doc(good_rule(to=[route(paths=[template])])))
    assert policy.rules[0].routes[0].paths[0].source == template


@pytest.mark.parametrize(
    "pattern",
    ["spiffe://example.org", "spiffe://example.org/**", "spiffe://example.org/ns/*/sa/batch",
     "spiffe://example.org/*", "spiffe://example.org/a/b/c"],
)
def test_valid_workload_patterns(pattern: str) -> None:
    policy = compile_policy(good_doc(good_rule(**{"from": {"workloads": [pattern]}})))
    assert policy.rules[0].workloads[0].source == pattern
    assert policy.trust_domains == frozenset({"example.org"})


def test_compiled_rule_fields() -> None:
    policy = compile_policy(good_doc(
        good_rule(id="a", description="d", shadow=True, effect="deny",
                  to=[route(methods=["GET", "HEAD"], paths=["/x/{id}"])]),
        good_rule(id="b", to=[route()]),
    ), source="p.yaml")
    a, b = policy.rules
    assert (a.id, a.index, a.effect, a.shadow, a.description) == ("a", 0, "deny", True, "d")
    assert a.routes[0].methods == frozenset({"GET", "HEAD"})
    assert a.routes[0].paths[0].params == ("id",)
    assert (b.index, b.shadow, b.routes[0].methods) == (1, False, None)
    assert policy.source == "p.yaml"


def test_example_policy_compiles_and_behaves() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    policy = compile_policy(doc, source=str(EXAMPLE),
                            known_trust_domains=frozenset({"example.org"}))
    assert policy.revision == "example-1"
    assert policy.trust_domains == frozenset({"example.org"})
    assert any(r.shadow for r in policy.rules)

    def decide(workload: str, method: str, path: str):
        sid = parse_spiffe_id(workload)
        return evaluate(policy, RequestContext(sid, str(sid), method, path))

    frontend = "spiffe://example.org/ns/demo/sa/frontend"
    batch = "spiffe://example.org/ns/demo/sa/batch"
    assert decide(frontend, "GET", "/api/items/1").outcome.effect == "allow"
    assert decide(frontend, "HEAD", "/api").outcome.effect == "allow"
    assert decide(frontend, "POST", "/api/orders").outcome.rule_id == "frontend-places-orders"
    assert decide(frontend, "POST", "/api/items").outcome.code == "no_matching_rule"
    assert decide(batch, "GET", "/api/admin/users").outcome.rule_id == "batch-no-admin"
    trial = decide("spiffe://example.org/ns/prod/sa/batch", "GET", "/api/orders/7")
    assert trial.outcome.effect == "deny"
    assert trial.shadow is not None and trial.shadow.rule_id == "batch-reads-orders-trial"
