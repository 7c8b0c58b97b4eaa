"""proxy.core.policy with tokens: token selectors, requirements, step-up, authorization_details,
and the `authentication` section.

Tables: tests/vectors/policy_token_cases.yaml (evaluation), policy_token_errors.yaml (load-time
problems with their exact paths), policy_authentication.yaml (`authentication_for`). Every table
case and every generated policy is also checked against the rule-by-rule references
(`evaluate_linear`, `CompiledPolicy.authentication_linear`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.core.model import Actor, Outcome, RequestContext, SpiffeId, TokenClaims, Verdict
from proxy.core.policy import (
    DEFAULT_AUTH,
    AuthRequirement,
    compile_policy,
    evaluate,
    evaluate_linear,
    extract_params,
)
from proxy.core.policy.params import (
    AMBIGUOUS,
    UNREADABLE,
    field_decimal,
    param_decimal,
    parse_query,
    query_param,
)
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import ConfigError

VECTORS = Path(__file__).parent.parent / "vectors"
CASES_DOC = yaml.safe_load((VECTORS / "policy_token_cases.yaml").read_text())
ERRORS_DOC = yaml.safe_load((VECTORS / "policy_token_errors.yaml").read_text())
AUTH_DOC = yaml.safe_load((VECTORS / "policy_authentication.yaml").read_text())
EXAMPLE = Path(__file__).parent.parent.parent / "config" / "policy.example.yaml"


# ---- builders -----------------------------------------------------------------------------------


def make_token(spec: dict[str, Any]) -> TokenClaims:
    """A TokenClaims from the vectors' shorthand (see policy_token_cases.yaml)."""
    claims = {"iss": spec["iss"], "sub": spec["sub"], **(spec.get("claims") or {})}
    return TokenClaims(
        issuer=spec["iss"],
        subject=spec["sub"],
        audience=("https://api.example.org",),
        expires_at=2_000_000_000,
        fingerprint="00" * 32,
        client_id=spec.get("client_id"),
        scopes=frozenset(spec.get("scopes") or ()),
        actors=tuple(Actor(sub=s) for s in spec.get("actors") or ()),
        acr=spec.get("acr"),
        amr=tuple(spec.get("amr") or ()),
        auth_time=spec.get("auth_time"),
        authorization_details=tuple(MappingProxyType(d) for d in spec.get("details") or ()),
        claims=MappingProxyType(claims),
    )


def make_ctx(workload: str, method: str, path: str, query: str = "",
             token: TokenClaims | None = None, workload_uri: str | None = None) -> RequestContext:
    sid = parse_spiffe_id(workload)
    return RequestContext(workload=sid, workload_uri=workload_uri or str(sid), method=method,
                          path=path, query=query, token=token)


def _outcome(d: dict[str, Any]) -> Outcome:
    return Outcome(d["effect"], d["code"], d["rule"], tuple(d.get("acr_values") or ()),
                   d.get("max_age_s"))


# ---- evaluation table ---------------------------------------------------------------------------

EVAL_CASES = [
    pytest.param(suite, case, id=f"{suite['name']}::{case['id']}")
    for suite in CASES_DOC["suites"]
    for case in suite["cases"]
]


@pytest.mark.parametrize(("suite", "case"), EVAL_CASES)
def test_token_case(suite: dict, case: dict) -> None:
    policy = compile_policy(suite["policy"])
    req = {**suite.get("request", {}), **{k: v for k, v in case.items()
                                            if k in ("workload", "workload_uri", "method", "path",
                                                     "query", "now")}}
    if "token" in case and case["token"] is None:
        token = None
    elif "token" in suite or "token" in case:
        token = make_token({**suite.get("token", {}), **(case.get("token") or {})})
    else:
        token = None
    c = make_ctx(req["workload"], req["method"], req["path"], req.get("query") or "", token,
                 req.get("workload_uri"))
    now = req.get("now")
    expected = Verdict(_outcome(case), _outcome(case["shadow"]) if "shadow" in case else None)
    assert evaluate(policy, c, now=now) == expected
    assert evaluate_linear(policy, c, now=now) == expected


# ---- load-time errors ---------------------------------------------------------------------------


def _error_doc(case: dict) -> dict:
    rule = copy.deepcopy(ERRORS_DOC["base_rule"])
    rule.update(copy.deepcopy(case.get("rule", {})))
    doc = {"version": 1, "revision": "r1", "rules": [rule]}
    doc.update(copy.deepcopy(case.get("doc", {})))
    return doc


def problems_of(doc: Any, **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        compile_policy(doc, **kw)
    return [(p.path, p.message) for p in info.value.problems]


@pytest.mark.parametrize("case", ERRORS_DOC["cases"], ids=[c["id"] for c in ERRORS_DOC["cases"]])
def test_token_compile_error(case: dict) -> None:
    problems = problems_of(_error_doc(case))
    assert any(p == case["path"] and case["message"] in m for p, m in problems), problems


def test_base_rule_of_error_table_compiles() -> None:
    compile_policy(_error_doc({}))


def test_peer_is_actor_in_unknown_trust_domain_can_never_match() -> None:
    rule = {"id": "r", "effect": "allow",
            "from": {"workloads": ["spiffe://example.org/**"],
                     "actors": ["spiffe://example.org/agents/*", "spiffe://partner.org/agent"]},
            "to": [{"paths": ["/a"]}], "require": {"peer_is": "actor"}}
    doc = {"version": 1, "revision": "r", "rules": [rule]}
    assert problems_of(doc, known_trust_domains=frozenset({"example.org"})) == [(
        "rules[0].from.actors[1]",
        "can never match: with require.peer_is the current actor must be the mTLS peer's SPIFFE "
        "ID, and there is no trust bundle for trust domain partner.org")]
    compile_policy(doc)  # without known trust domains nothing can be said
    rule["from"]["actor_position"] = "any"  # a prior actor need not be the peer
    compile_policy(doc, known_trust_domains=frozenset({"example.org"}))


def test_actor_patterns_do_not_need_a_trust_bundle() -> None:
    doc = {"version": 1, "revision": "r", "rules": [
        {"id": "r", "effect": "allow", "from": {"actors": ["spiffe://partner.org/agents/*"]},
         "to": [{"paths": ["/a"]}]}]}
    compile_policy(doc, known_trust_domains=frozenset({"example.org"}))


def test_every_token_problem_is_reported_at_once() -> None:
    doc = {
        "version": 1, "revision": "r",
        "authentication": [{"paths": ["/a"], "token": "forbidden", "binding": "dpop"},
                           {"paths": ["/b"], "token": "maybe"}],
        "rules": [
            {"id": "a", "effect": "allow", "from": {"scopes": ["a b"], "claims": {"exp": "1"}},
             "to": [{"paths": ["/a"]}],
             "require": {"max_auth_age_s": 0,
                         "authorization_details": {"type": "", "bounds": {"x": {"le": True}}}}},
            {"id": "b", "effect": "deny", "from": {}, "to": [{"paths": ["/b"]}],
             "require": {"peer_is": "actor"}},
        ],
    }
    assert [p for p, _ in problems_of(doc)] == [
        "authentication[0].binding",
        "authentication[1].token",
        "rules[0].from.scopes[0]",
        "rules[0].from.claims.exp",
        "rules[0].require.max_auth_age_s",
        "rules[0].require.authorization_details.type",
        "rules[0].require.authorization_details.bounds.x.le",
        "rules[1].from",
        "rules[1].require",
    ]


@pytest.mark.parametrize("bounds", [
    {"amount": {"ge": 5, "le": 5}},
    {"amount": {"gt": 0, "le": ["max_amount", 5000]}},
    {"amount": {"gt": 5000.5, "lt": 5001}},
    {"amount": {"lt": 0}, "fee": {"ge": "min_fee"}},
])
def test_valid_bounds(bounds: dict) -> None:
    doc = {"version": 1, "revision": "r", "rules": [
        {"id": "r", "effect": "allow", "from": {"subjects": [{"issuer": "i", "sub": "*"}]},
         "to": [{"paths": ["/a"]}],
         "require": {"authorization_details": {"type": "t", "bounds": bounds}}}]}
    compile_policy(doc)


def test_compiled_token_rule_fields() -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [
        {"id": "t", "effect": "allow",
         "from": {"subjects": [{"issuer": "i", "sub": "a"}, {"issuer": "i", "sub": "b"},
                               {"issuer": "j", "sub": "*"}, {"issuer": "j", "sub": "c"}],
                  "actors": ["spiffe://example.org/agents/*", "bot"], "actor_position": "any",
                  "clients": ["c1"], "scopes": ["s1", "s2"], "acr": ["x", "urn:mfa"],
                  "amr": ["pwd"],
                  "claims": {"department": "finance", "level": ["gold", "silver"]}},
         "to": [{"paths": ["/a/{id}"]}],
         "require": {"peer_is": "actor", "max_delegation_depth": 2, "acr_values": ["urn:mfa"],
                     "max_auth_age_s": 60,
                     "authorization_details": {"type": "t", "match": {"id": "id"},
                                               "bounds": {"n": {"le": ["max", 3]}}}}},
        {"id": "plain", "effect": "deny", "from": {"workloads": ["spiffe://example.org/w"]},
         "to": [{"paths": ["/a"]}]},
    ]})
    t, plain = policy.rules
    assert t.workloads == () and t.needs_token and not plain.needs_token
    assert t.token is not None and dict(t.token.subjects) == {"i": frozenset({"a", "b"}),
                                                              "j": None}
    assert [a.source for a in t.token.actors] == ["spiffe://example.org/agents/*", "bot"]
    assert t.token.actor_position == "any"
    assert t.token.scopes == frozenset({"s1", "s2"}) and t.token.amr == frozenset({"pwd"})
    assert t.token.claims == (("department", frozenset({"finance"})),
                              ("level", frozenset({"gold", "silver"})))
    req = t.require
    assert req is not None
    assert (req.peer_is, req.max_delegation_depth, req.acr_values, req.max_auth_age_s) == \
        ("actor", 2, ("urn:mfa",), 60)
    details = req.authorization_details
    assert details is not None and details.match == (("id", "id"),)
    assert [(b.param, b.op, b.field, b.literal) for b in details.bounds] == \
        [("n", "le", "max", None), ("n", "le", None, 3)]
    assert t.step_up == Outcome("step_up", "step_up_required", "t", ("urn:mfa",), 60)
    assert plain.step_up is None and plain.token is None and plain.require is None


# ---- authentication_for -------------------------------------------------------------------------

_TRIVIAL_RULE = {"id": "r", "effect": "allow", "from": {"workloads": ["spiffe://example.org/a"]},
                 "to": [{"paths": ["/"]}]}

AUTH_CASES = [
    pytest.param(suite, case, id=f"{suite['name']}::{case['id']}")
    for suite in AUTH_DOC["suites"]
    for case in suite["cases"]
]


@pytest.mark.parametrize(("suite", "case"), AUTH_CASES)
def test_authentication_case(suite: dict, case: dict) -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [_TRIVIAL_RULE],
                             "authentication": suite["authentication"]})
    expected = AuthRequirement(case["token"], case["binding"], case["entry"])
    assert policy.authentication_for(case["method"], case["path"]) == expected
    assert policy.authentication_linear(case["method"], case["path"]) == expected


def test_authentication_defaults_without_section() -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [_TRIVIAL_RULE]})
    assert policy.authentication == ()
    assert policy.authentication_for("POST", "/api/x") == DEFAULT_AUTH
    assert DEFAULT_AUTH == AuthRequirement("optional", "any", None)


# ---- the example policy: the expense assistant ---------------------------------------------------

AGENT = "spiffe://example.org/agents/expense-assistant"
IDP = "https://idp.example.org"


def _alice(**over: Any) -> TokenClaims:
    spec: dict[str, Any] = {
        "iss": IDP, "sub": "alice", "actors": [AGENT], "acr": "urn:example:pwd",
        "claims": {"department": "finance"},
        "details": [{"type": "invoice_approval", "invoice_id": "INV-8831",
                     "max_amount": 20000}],
    }
    spec.update(over)
    return make_token(spec)


def test_example_expense_assistant() -> None:
    """The expense example end to end through the core API (the full table of cases is
    config/policy-tests/expense.yaml, run by tests/test_policy_cli.py)."""
    policy = compile_policy(yaml.safe_load(EXAMPLE.read_text()), source=str(EXAMPLE),
                            known_trust_domains=frozenset({"example.org"}))

    def decide(amount: str, token: TokenClaims | None = None, *, invoice: str = "INV-8831",
               department: str = "finance", workload: str = AGENT) -> Outcome:
        path = f"/api/invoices/{invoice}/approve"
        spec = policy.action_for("POST", path)
        assert spec is not None and spec.name == "invoice.approve" and spec.needs_body
        query = f"department={department}"
        params = extract_params(spec, spec.captures(path), query,
                                f'{{"amount": {amount}}}'.encode())
        c = make_ctx(workload, "POST", path, query, token if token is not None else _alice())
        c = c._replace(action=spec.name, params=params)
        verdict = evaluate(policy, c, now=1_000_000.0)
        assert verdict == evaluate_linear(policy, c, now=1_000_000.0)
        return verdict.outcome

    approve = "expense-agent-approves-invoice"
    large = "expense-agent-approves-large-invoice"
    over = "invoice-over-10000-needs-two-approvals"
    assert decide("4800") == Outcome("allow", "allowed", approve)
    assert decide("5000.00") == Outcome("allow", "allowed", approve)
    # someone else's invoice, another department, an amount beyond any rule
    assert decide("4800", invoice="INV-9999").code == "no_matching_rule"
    assert decide("4800", department="sales").code == "no_matching_rule"
    assert decide("999999") == Outcome("deny", "denied_by_rule", over)
    # above 5,000: step up to MFA; with MFA allowed; above 10,000: denied (two approvals: later)
    assert decide("7000") == Outcome("step_up", "step_up_required", large, ("urn:example:mfa",))
    assert decide("7000", _alice(acr="urn:example:mfa")) == Outcome("allow", "allowed", large)
    assert decide("10000.01", _alice(acr="urn:example:mfa")) == \
        Outcome("deny", "denied_by_rule", over)
    # the user's consent caps the amount below the policy's limits
    capped = _alice(details=[{"type": "invoice_approval", "invoice_id": "INV-8831",
                              "max_amount": 3000}])
    assert decide("4800", capped).code == "no_matching_rule"
    # the user's department, another issuer, another agent using Alice's token, a deeper chain
    assert decide("4800", _alice(claims={"department": "sales"})).effect == "deny"
    assert decide("4800", _alice(claims={})).effect == "deny"
    assert decide("4800", _alice(iss="https://idp.evil.org")).effect == "deny"
    assert decide("4800", _alice(actors=["spiffe://example.org/agents/other"]),
                  workload="spiffe://example.org/agents/other").effect == "deny"
    assert decide("4800", _alice(actors=["spiffe://example.org/agents/other"])
                  ).effect == "deny"
    assert decide("4800", _alice(actors=[AGENT, "spiffe://example.org/agents/x"])
                  ).effect == "deny"
    # no token at all
    no_token = make_ctx(AGENT, "POST", "/api/invoices/INV-8831/approve", "department=finance")
    assert evaluate(policy, no_token).outcome.code == "no_matching_rule"
    # the route needs a DPoP-bound token; other routes keep the defaults
    assert policy.authentication_for("POST", "/api/invoices/INV-8831/approve") == \
        AuthRequirement("required", "dpop", 0)
    assert policy.authentication_for("GET", "/api/invoices/INV-8831") == DEFAULT_AUTH
    assert policy.action_for("GET", "/api/invoices/INV-8831/approve") is None


# ---- parameters and numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(("query", "name", "expected"), [
    ("a=1&b=2", "a", "1"),
    ("a=1&b=2", "c", None),
    ("a", "a", ""),
    ("a=", "a", ""),
    ("a=x=y", "a", "x=y"),
    ("a=1&&b=2&", "b", "2"),
    ("a=%41+b", "a", "A b"),
    ("a=%2B", "a", "+"),
    ("caf%C3%A9=1", "café", "1"),
    ("a=1&a=1", "a", AMBIGUOUS),
    ("a=1&A=2", "a", AMBIGUOUS),
    ("A=2", "a", AMBIGUOUS),
    ("a[]=1", "a", AMBIGUOUS),
    ("a.b=1&a_b=2", "a_b", AMBIGUOUS),
    ("%61=1&a=2", "a", AMBIGUOUS),
    ("a=1&b=%", "a", AMBIGUOUS),
    ("a=1&b=%4", "a", AMBIGUOUS),
    ("a=1&b=%FF", "a", AMBIGUOUS),
    ("a=1;a=2", "a", "1;a=2"),
])
def test_query_parameters(query: str, name: str, expected: Any) -> None:
    got = query_param(parse_query(query), name)
    if expected is AMBIGUOUS:
        assert got is AMBIGUOUS
    else:
        assert got == expected


def test_unreadable_query_is_one_object() -> None:
    assert parse_query("x=%zz") is UNREADABLE
    assert parse_query("") == {}


@pytest.mark.parametrize(("text", "ok"), [
    ("0", True), ("4800", True), ("-1", True), ("4800.50", True), ("007", True),
    ("", False), ("+1", False), (" 1", False), ("1 ", False), ("1e3", False), ("1.", False),
    (".5", False), ("1_000", False), ("1,000", False), ("Infinity", False), ("NaN", False),
    ("\u0661", False), ("1\n", False), ("0x10", False), ("9" * 65, False),
])
def test_param_decimal(text: str, ok: bool) -> None:
    assert (param_decimal(text) is not None) is ok


@pytest.mark.parametrize(("value", "expected"), [
    (5000, "5000"), (4800.1, "4800.1"), ("5000.00", "5000.00"), (float("inf"), None),
    (float("nan"), None), (True, None), (None, None), ("1e3", None), ([1], None),
    (MappingProxyType({}), None),
])
def test_field_decimal(value: Any, expected: str | None) -> None:
    got = field_decimal(value)
    assert (None if got is None else str(got)) == expected


# ---- properties ---------------------------------------------------------------------------------

_ISSUERS = ["https://idp.example.org", "https://idp.partner.org"]
_SUBS = ["alice", "bob"]
_AGENTS = ["spiffe://example.org/agents/a", "spiffe://example.org/agents/b"]
_ACTOR_SUBS = _AGENTS + ["bot", "spiffe://EXAMPLE.org/agents/a", "spiffe://example.org/agents/a/",
                         "spiffe://example.org/agents/a/b", ""]
_ACTOR_PATTERNS = ["spiffe://example.org/agents/*", "spiffe://example.org/**",
                   "spiffe://example.org/agents/a", "bot"]
_WORKLOAD_PATTERNS = ["spiffe://example.org/agents/*", "spiffe://example.org/agents/a",
                      "spiffe://example.org/**", "spiffe://example.org/ns/a/sa/web"]
_TEMPLATES = ["/inv/{invoice_id}/approve", "/inv/**", "/pay/{account}", "/pay", "/a", "/**",
              "/{x}/{invoice_id}/approve"]
_PATHS = ["/inv/INV-1/approve", "/inv/1/approve", "/inv/INV%201/approve", "/pay/A1", "/pay",
          "/a", "/x", "/"]
_QUERIES = ["", "amount=4800", "amount=5000.5", "amount=1&amount=2", "account=A1", "amount=x",
            "invoice_id=INV-1&amount=1", "x=%zz", "amount=-0", "Amount=1", "account=A+1"]
_DETAILS_RULES = [
    {"type": "invoice_approval", "match": {"invoice_id": "invoice_id"},
     "bounds": {"amount": {"gt": 0, "le": "max_amount"}}},
    {"type": "invoice_approval", "bounds": {"amount": {"le": ["max_amount", 5000]}}},
    {"type": "payment", "match": {"account": "account"}},
    {"type": "payment"},
]

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_DETAIL_ENTRY = st.one_of(
    st.fixed_dictionaries({
        "type": st.sampled_from(["invoice_approval", "payment", "other"]),
        "invoice_id": st.sampled_from(["INV-1", "1", 1, 1.0, "INV 1", True]),
        "account": st.sampled_from(["A1", "A 1", None]),
        "max_amount": st.sampled_from([5000, "5000.5", 4800.0, float("inf"), float("nan"),
                                       True, "x", -1, None]),
    }),
    st.dictionaries(st.sampled_from(["type", "invoice_id", "max_amount", "account"])
                    | st.text(max_size=4), _JSON, max_size=4),
    _JSON,  # not even an object: a verified token never has it, evaluate must not mind
)


@st.composite
def tokens(draw: Any) -> TokenClaims | None:
    if draw(st.integers(0, 7)) == 0:
        return None
    extra = draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=3))
    claims = {**extra, "department": draw(st.sampled_from(["finance", "sales", 7, None]))}
    return TokenClaims(
        issuer=draw(st.sampled_from(_ISSUERS + [""])),
        subject=draw(st.sampled_from(_SUBS + [""])),
        audience=("api",),
        expires_at=2_000_000_000,
        fingerprint="f",
        client_id=draw(st.sampled_from([None, "app-1"] + _AGENTS)),
        scopes=frozenset(draw(st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3))),
        actors=tuple(Actor(sub=s) for s in draw(st.lists(st.sampled_from(_ACTOR_SUBS),
                                                         max_size=3))),
        acr=draw(st.sampled_from([None, "urn:mfa", "urn:pwd"])),
        amr=tuple(draw(st.lists(st.sampled_from(["pwd", "otp", "hwk"]), max_size=3))),
        auth_time=draw(st.sampled_from([None, 9000, 9800, 10000, -5])),
        authorization_details=tuple(draw(st.lists(_DETAIL_ENTRY, max_size=3))),
        claims=MappingProxyType(claims),
    )


@st.composite
def token_policies(draw: Any, effects: tuple[str, ...] = ("allow", "deny")) -> dict:
    rules = []
    for i in range(draw(st.integers(1, 10))):
        effect = draw(st.sampled_from(effects))
        frm: dict[str, Any] = {}
        if draw(st.booleans()):
            frm["workloads"] = draw(st.lists(st.sampled_from(_WORKLOAD_PATTERNS), min_size=1,
                                             max_size=2))
        if draw(st.integers(0, 2)) == 0:
            frm["subjects"] = [{"issuer": draw(st.sampled_from(_ISSUERS)),
                                "sub": draw(st.sampled_from(_SUBS + ["*"]))}]
        if draw(st.integers(0, 3)) == 0:
            frm["actors"] = draw(st.lists(st.sampled_from(_ACTOR_PATTERNS), min_size=1,
                                          max_size=2))
            if draw(st.booleans()):
                frm["actor_position"] = draw(st.sampled_from(["current", "any"]))
        if draw(st.integers(0, 5)) == 0:
            frm["clients"] = [draw(st.sampled_from(["app-1"] + _AGENTS))]
        if draw(st.integers(0, 5)) == 0:
            frm["scopes"] = draw(st.lists(st.sampled_from(["read", "write"]), min_size=1))
        if draw(st.integers(0, 6)) == 0:
            frm["acr"] = ["urn:pwd"]
        if draw(st.integers(0, 6)) == 0:
            frm["amr"] = ["otp"]
        if draw(st.integers(0, 5)) == 0:
            frm["claims"] = {"department": draw(st.sampled_from(["finance",
                                                                 ["finance", "sales"]]))}
        if not frm:
            frm["workloads"] = ["spiffe://example.org/**"]
        route: dict[str, Any] = {"paths": draw(st.lists(st.sampled_from(_TEMPLATES), min_size=1,
                                                        max_size=2))}
        if draw(st.booleans()):
            route["methods"] = draw(st.sampled_from([["POST"], ["GET", "POST"]]))
        rule: dict[str, Any] = {"id": f"r{i}", "effect": effect, "shadow": draw(st.booleans()),
                                "from": frm, "to": [route]}
        if effect == "allow" and draw(st.integers(0, 2)):
            req: dict[str, Any] = {}
            if draw(st.integers(0, 3)) == 0:
                req["peer_is"] = draw(st.sampled_from(["actor", "client"]))
            if draw(st.integers(0, 3)) == 0:
                req["max_delegation_depth"] = draw(st.sampled_from([1, 2]))
            if draw(st.integers(0, 2)):
                req["acr_values"] = draw(st.sampled_from([["urn:mfa"], ["urn:mfa", "urn:hwk"]]))
            if draw(st.integers(0, 2)) == 0:
                req["max_auth_age_s"] = draw(st.sampled_from([60, 300]))
            if draw(st.integers(0, 2)) == 0:
                req["authorization_details"] = draw(st.sampled_from(_DETAILS_RULES))
            if req:
                rule["require"] = req
        rules.append(rule)
    return {"version": 1, "revision": "p", "rules": rules}


def _compiled(doc: dict) -> Any:
    try:
        return compile_policy(doc)
    except ConfigError:
        assume(False)  # a combination the compiler rightly rejects (e.g. peer_is + plain actor)


@st.composite
def token_contexts(draw: Any) -> tuple[RequestContext, float | None]:
    workload = draw(st.sampled_from(_AGENTS + ["spiffe://example.org/ns/a/sa/web"]))
    sid = parse_spiffe_id(workload)
    uri = draw(st.sampled_from([str(sid), str(sid), _AGENTS[0]]))
    ctx = RequestContext(
        workload=sid, workload_uri=uri,
        method=draw(st.sampled_from(["GET", "POST"])),
        path=draw(st.sampled_from(_PATHS)),
        query=draw(st.sampled_from(_QUERIES) if draw(st.integers(0, 4)) else st.text(max_size=24)),
        token=draw(tokens()),
    )
    now = draw(st.sampled_from([None, 10000.0, float("nan"), float("inf")]))
    return ctx, now


_ODD_CONTEXT = st.builds(  # malformed workloads, paths and methods, as in test_policy_eval
    lambda td, p, uri, m, path, q, tok: RequestContext(SpiffeId(td, p), uri, m, path, q, tok),
    st.sampled_from(["example.org", "", "x"]), st.one_of(st.just(""), st.text(max_size=10)),
    st.text(max_size=10), st.text(max_size=6), st.text(max_size=16), st.text(max_size=16),
    tokens())

_SETTINGS = settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])


@_SETTINGS
@given(token_policies(), token_contexts())
def test_token_evaluate_matches_the_reference(doc: dict, case: tuple) -> None:
    policy = _compiled(doc)
    ctx, now = case
    verdict = evaluate(policy, ctx, now=now)
    assert verdict == evaluate_linear(policy, ctx, now=now)
    out = verdict.outcome
    assert out.effect in ("allow", "deny", "step_up")
    if out.effect != "deny":
        rule = policy.rule(out.rule_id)
        assert rule is not None and rule.effect == "allow" and not rule.shadow
        if out.effect == "step_up":
            assert out == rule.step_up
    if ctx.token is None and out.effect != "deny":
        assert not policy.rule(out.rule_id).needs_token


@_SETTINGS
@given(token_policies(), st.one_of(_ODD_CONTEXT, token_contexts().map(lambda c: c[0])),
       st.one_of(st.none(), st.floats()))
def test_token_evaluate_never_raises(doc: dict, ctx: RequestContext, now: float | None) -> None:
    policy = _compiled(doc)
    assert evaluate(policy, ctx, now=now) == evaluate_linear(policy, ctx, now=now)


@_SETTINGS
@given(token_policies(effects=("deny",)), token_contexts())
def test_token_default_deny_without_allow_rules(doc: dict, case: tuple) -> None:
    ctx, now = case
    verdict = evaluate(_compiled(doc), ctx, now=now)
    assert verdict.outcome.effect == "deny"
    assert verdict.shadow is None or verdict.shadow.effect == "deny"


@_SETTINGS
@given(token_policies(effects=("allow",)), token_contexts())
def test_token_shadow_only_rules_never_decide(doc: dict, case: tuple) -> None:
    for rule in doc["rules"]:
        rule["shadow"] = True
    ctx, now = case
    assert evaluate(_compiled(doc), ctx, now=now).outcome == Outcome("deny", "no_matching_rule",
                                                                     None)


_AUTH_TEMPLATES = ["/api/**", "/api/invoices/**", "/api/invoices/{id}", "/api/*/x", "/a", "/**",
                   "/a/", "/public/*"]
_AUTH_PATHS = ["/api", "/api/invoices", "/api/invoices/1", "/api/y/x", "/a", "/a/", "/public/p",
               "/public", "/", "/zzz", "x"]


@st.composite
def auth_sections(draw: Any) -> list[dict]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        e: dict[str, Any] = {"paths": draw(st.lists(st.sampled_from(_AUTH_TEMPLATES), min_size=1,
                                                    max_size=2)),
                             "token": draw(st.sampled_from(["required", "optional"]))}
        if draw(st.booleans()):
            e["methods"] = draw(st.sampled_from([["GET"], ["POST"], ["GET", "POST"]]))
        if draw(st.booleans()):
            e["binding"] = draw(st.sampled_from(["dpop", "mtls", "any", "none"]))
        out.append(e)
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
@given(auth_sections(), st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(_AUTH_PATHS))
def test_authentication_for_matches_the_reference(section: list, method: str, path: str) -> None:
    policy = _compiled({"version": 1, "revision": "r", "rules": [_TRIVIAL_RULE],
                        "authentication": section})
    got = policy.authentication_for(method, path)
    assert got == policy.authentication_linear(method, path)
    if got.entry is not None:
        assert policy.authentication[got.entry].route.matches(method, path)
