"""proxy.core.policy actions: parameter extraction (tests/vectors/policy_params.yaml), the JSON
depth cap, `action_for` (first match, indexed, against the linear reference) and properties
(extraction never raises anything but its stable 400/413 errors)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.policy import ActionSpec, compile_policy, extract_params
from proxy.core.policy.actions import MAX_JSON_DEPTH, json_depth_ok, parse_pointer
from proxy.errors import BadRequest, ConfigError, PayloadTooLarge

VECTORS = Path(__file__).parent.parent / "vectors"
PARAMS_DOC = yaml.safe_load((VECTORS / "policy_params.yaml").read_text())
_RULE = {"id": "r", "effect": "allow", "from": {"workloads": ["spiffe://example.org/a"]},
         "to": [{"paths": ["/"]}]}


def compile_actions(*actions: dict) -> Any:
    return compile_policy({"version": 1, "revision": "r", "actions": list(actions),
                           "rules": [_RULE]})


def _expected(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"decimal"}:
        return Decimal(v["decimal"])
    if isinstance(v, dict):
        return {k: _expected(x) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(_expected(x) for x in v)
    return v


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(got, MappingProxyType) and got.keys() == expected.keys() and \
            all(_same(got[k], expected[k]) for k in expected)
    if isinstance(expected, tuple):
        return type(got) is tuple and len(got) == len(expected) and \
            all(_same(a, b) for a, b in zip(got, expected))
    return type(got) is type(expected) and got == expected


CASES = [pytest.param(suite, case, id=f"{suite['name']}::{case['id']}")
         for suite in PARAMS_DOC["suites"] for case in suite["cases"]]


@pytest.mark.parametrize(("suite", "case"), CASES)
def test_extract_params(suite: dict, case: dict) -> None:
    policy = compile_actions(suite["action"])
    spec = policy.action_for(suite["action"].get("methods", ["GET"])[0], case["path"])
    assert spec is not None and spec.name == suite["action"]["name"]
    body = bytes.fromhex(case["body_hex"]) if "body_hex" in case else \
        None if "body" not in case else case["body"].encode()
    args = (spec, spec.captures(case["path"]), case["query"], body)
    if "code" in case:
        with pytest.raises((BadRequest, PayloadTooLarge)) as info:
            extract_params(*args, content_type=case.get("content_type"))
        assert info.value.code == case["code"]
        assert info.value.status == (413 if case["code"] == "body_too_large" else 400)
    else:
        got = extract_params(*args, content_type=case.get("content_type"))
        assert _same(got, _expected(case["params"])), dict(got)


def test_needs_body_and_limits() -> None:
    policy = compile_actions(
        {"name": "read", "paths": ["/r/{id}"], "params": {"id": {"from": "path"}}},
        {"name": "write", "methods": ["PUT"], "paths": ["/w"], "max_body_bytes": 10,
         "params": {"x": {"from": "body", "pointer": "/x"}}},
        {"name": "plain", "paths": ["/p"]})
    read, write, plain = policy.actions
    assert (read.needs_body, write.needs_body, plain.needs_body) == (False, True, False)
    assert (read.max_body_bytes, write.max_body_bytes) == (65536, 10)
    assert extract_params(plain, {}, "", None) == {}
    # a body is never read for an action without body parameters
    assert extract_params(read, {"id": "1"}, "", b"not json at all") == {"id": "1"}
    with pytest.raises(PayloadTooLarge) as info:
        extract_params(write, {}, "", b'{"x": 12345678}')
    assert info.value.code == "body_too_large"
    assert extract_params(write, {}, "", b'{"x": 1}') == {"x": 1}


@pytest.mark.parametrize(("depth", "ok"), [(1, True), (MAX_JSON_DEPTH, True),
                                           (MAX_JSON_DEPTH + 1, False), (100_000, False)])
def test_json_depth_cap(depth: int, ok: bool) -> None:
    body = b"[" * depth + b"]" * depth
    assert json_depth_ok(body, MAX_JSON_DEPTH) is ok
    mixed = b'{"a":' * depth + b"1" + b"}" * depth
    assert json_depth_ok(mixed, MAX_JSON_DEPTH) is ok


def test_json_depth_counts_nesting_not_size() -> None:
    wide = b"[" + b",".join([b"[1]"] * 10_000) + b"]"
    assert json_depth_ok(wide, 2)
    assert not json_depth_ok(wide, 1)
    assert json_depth_ok(b'["[[[[[[[[\\"[[[["]', 1)  # brackets in strings (and escapes) ignored


def test_deep_body_never_reaches_the_parser() -> None:
    spec = compile_actions({"name": "w", "paths": ["/w"],
                            "params": {"x": {"from": "body", "pointer": "/x"}}}).actions[0]
    spec = ActionSpec(spec.name, 0, spec.route, spec.params, max_body_bytes=10_000_000)
    with pytest.raises(BadRequest) as info:
        extract_params(spec, {}, "", b"[" * 1_000_000 + b"]" * 1_000_000)
    assert info.value.code == "json_too_deep"


@pytest.mark.parametrize(("text", "tokens"), [
    ("", ()), ("/", ("",)), ("/a/b", ("a", "b")), ("/a~1b", ("a/b",)), ("/m~0n", ("m~n",)),
    ("/~01", ("~1",)), ("a", None), ("/a~", None), ("/a~2", None),
])
def test_parse_pointer(text: str, tokens: tuple[str, ...] | None) -> None:
    assert parse_pointer(text) == tokens


# ---- action_for ---------------------------------------------------------------------------------


def test_action_for_first_match_in_file_order() -> None:
    policy = compile_actions(
        {"name": "approve", "methods": ["POST"], "paths": ["/inv/{id}/approve"]},
        {"name": "any-inv", "paths": ["/inv/**"]},
        {"name": "read", "methods": ["GET"], "paths": ["/inv/{id}", "/bills/{id}"]})
    names = {(m, p): getattr(policy.action_for(m, p), "name", None)
             for m in ("GET", "POST") for p in ("/inv/1/approve", "/inv/1", "/bills/1", "/x",
                                                 "x", "")}
    assert names == {
        ("GET", "/inv/1/approve"): "any-inv", ("POST", "/inv/1/approve"): "approve",
        ("GET", "/inv/1"): "any-inv", ("POST", "/inv/1"): "any-inv",
        ("GET", "/bills/1"): "read", ("POST", "/bills/1"): None,
        ("GET", "/x"): None, ("POST", "/x"): None, ("GET", "x"): None, ("POST", "x"): None,
        ("GET", ""): None, ("POST", ""): None,
    }
    assert policy.action("read") is policy.actions[2] and policy.action("nope") is None
    assert policy.actions[0].captures("/inv/INV%201/approve") == {"id": "INV%201"}
    assert policy.actions[0].captures("/elsewhere") == {}


def test_policy_without_actions() -> None:
    policy = compile_policy({"version": 1, "revision": "r", "rules": [_RULE]})
    assert policy.actions == () and policy.action_for("GET", "/") is None


_TEMPLATES = ["/a", "/a/{x}", "/a/**", "/{x}/b", "/**", "/a/b/c", "/b/*", "/"]
_PATHS = ["/", "/a", "/a/b", "/a/b/c", "/x/b", "/b/1", "/b", "/c/d/e"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(st.tuples(st.lists(st.sampled_from(_TEMPLATES), min_size=1, max_size=2,
                                   unique=True),
                          st.sampled_from([None, ["GET"], ["POST"], ["GET", "POST"]])),
                min_size=1, max_size=8),
       st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(_PATHS))
def test_action_for_matches_the_reference(entries: list, method: str, path: str) -> None:
    actions = []
    for k, (paths, methods) in enumerate(entries):
        a: dict[str, Any] = {"name": f"a{k}", "paths": paths}
        if methods is not None:
            a["methods"] = methods
        actions.append(a)
    try:
        policy = compile_actions(*actions)
    except ConfigError as exc:  # shadowed entries are refused: the rest must be fine
        assert all("can never match" in p.message for p in exc.problems)
        return
    got = policy.action_for(method, path)
    assert got is policy.action_linear(method, path)
    if got is not None:
        assert got.route.matches(method, path)


# ---- properties: extraction never raises anything else -------------------------------------------

_SPEC = compile_actions({
    "name": "x", "methods": ["POST"], "paths": ["/x/{id}"],
    "params": {"id": {"from": "path", "type": "integer"},
               "n": {"from": "body", "pointer": "/n", "type": "number"},
               "s": {"from": "body", "pointer": "/a/0/s", "type": "string", "required": False},
               "b": {"from": "query", "type": "boolean", "required": False},
               "q": {"from": "query", "required": False},
               "any": {"from": "body", "pointer": "/any", "required": False}}}).actions[0]

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=10)


@settings(max_examples=400)
@given(st.text(max_size=12),
       st.one_of(st.text(max_size=24), st.sampled_from(["b=true", "q=1&q=2", "b=%zz"])),
       st.one_of(st.none(), st.binary(max_size=40),
                 _JSON.map(lambda v: json.dumps({"n": v, "a": [{"s": v}], "any": v}).encode())),
       st.one_of(st.none(), st.text(max_size=30)))
def test_extract_params_raises_only_stable_errors(capture: str, query: str, body: bytes | None,
                                                  content_type: str | None) -> None:
    try:
        got = extract_params(_SPEC, {"id": capture}, query, body, content_type=content_type)
    except (BadRequest, PayloadTooLarge) as err:
        assert err.code in ("missing_param", "param_type", "ambiguous_param",
                            "invalid_json_body", "json_too_deep", "body_too_large",
                            "unsupported_content_type")
        return
    assert isinstance(got, MappingProxyType)
    assert type(got["id"]) is int and type(got["n"]) is Decimal


def test_max_json_depth_is_per_action() -> None:
    doc = {"name": "w", "paths": ["/w"], "max_json_depth": 2,
           "params": {"x": {"from": "body", "pointer": "/x"}}}
    spec = compile_actions(doc).actions[0]
    assert spec.max_json_depth == 2
    assert extract_params(spec, {}, "", b'{"x": [1]}')["x"] == (1,)
    with pytest.raises(BadRequest) as info:
        extract_params(spec, {}, "", b'{"x": [[1]]}')
    assert info.value.code == "json_too_deep"
    default = compile_actions({**doc, "max_json_depth": 32}).actions[0]
    assert extract_params(default, {}, "", b'{"x": [[1]]}')["x"] == ((1,),)
