"""proxy.core.cel: the CEL checker (load-time errors), the rewrite into flat variables (it must
not change what a condition means), run-time errors, and value conversion."""

from __future__ import annotations

import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import cel as runtime
import pytest

from proxy.core.cel import (
    BOOL,
    DOUBLE,
    DYN,
    INT,
    MISSING,
    STRING,
    TIMESTAMP,
    CelCompileError,
    Ref,
    compile_condition,
    list_of,
    map_of,
    object_of,
    to_cel,
)

ENV = {
    "request": object_of("request", {
        "method": STRING, "query": map_of(STRING, STRING),
        "params": map_of(STRING, STRING, keys={"invoice_id": STRING}, name="request.params"),
    }),
    "token": object_of("token", {
        "present": BOOL, "sub": STRING, "scopes": list_of(STRING), "auth_time": INT,
        "claims": map_of(STRING, DYN), "actors": list_of(STRING),
        "authorization_details": list_of(map_of(STRING, DYN)),
    }),
    "action": object_of("action", {
        "name": STRING,
        "params": map_of(STRING, DYN, keys={"amount": DOUBLE, "note": STRING},
                         name="action.params"),
    }),
    "now": TIMESTAMP,
}

# (id, source, fragment of the message)
ERRORS = [
    ("unknown-variable", "tokn.sub == 'a'", "unknown variable 'tokn' (declared: action, now, "
                                            "request, token) (column 1)"),
    ("unknown-variable-in-macro", "token.scopes.all(s, t == s)", "unknown variable 't'"),
    ("macro-variable-out-of-scope", "token.scopes.all(s, s != '') && s == ''",
     "unknown variable 's'"),
    ("unknown-field", "token.subject == 'a'", "token has no field 'subject' (fields: "),
    ("unknown-field-index", "token['subject'] == 'a'", "token has no field 'subject'"),
    ("unknown-declared-key", "request.params.id == 'a'",
     "request.params never has the key 'id' (its keys: invoice_id)"),
    ("unknown-declared-key-index", "action.params['amt'] > 1.0",
     "action.params never has the key 'amt'"),
    ("has-unknown-key", "has(action.params.amt)", "never has the key 'amt'"),
    ("field-of-string", "token.sub.length == 1", "string has no fields"),
    ("syntax-error", "token.sub == ", "syntax error at 1:14: Syntax error: mismatched input"),
    ("syntax-unclosed", "(token.sub == 'a'", "syntax error at 1:"),
    ("syntax-reserved", "token.sub == 'a' && if", "syntax error"),
    ("not-bool-string", "token.sub", "the condition must be a bool; its type is string"),
    ("not-bool-int", "token.auth_time + 1", "its type is int"),
    ("not-bool-list", "token.scopes", "its type is list(string)"),
    ("mixed-arithmetic", "action.params.amount + 1 > 2.0", "no overload of '+' for (double, int)"),
    ("string-plus-int", "token.sub + 1 == 'a1'", "no overload of '+' for (string, int)"),
    ("eq-never-true", "token.sub == 1", "no overload of '==' for (string, int)"),
    ("compare-string-number", "token.sub < 3", "no overload of '<' for (string, int)"),
    ("not-on-string", "!token.sub", "'!' needs a bool"),
    ("and-on-int", "token.auth_time && true", "'&&' needs bool operands"),
    ("ternary-condition", "token.sub ? true : false", "the condition of '?:' must be a bool"),
    ("in-wrong-element", "1 in token.scopes", "never true"),
    ("in-not-collection", "'a' in token.sub", "'in' needs a list or a map"),
    ("index-list-with-string", "token.scopes['a'] == 'b'", "a list index must be an int"),
    ("index-string", "token.sub[0] == 'a'", "cannot be indexed"),
    ("unknown-function", "lower(token.sub) == 'a'", "unknown function lower()"),
    ("unknown-method", "token.sub.lowerAscii() == 'a'", "unknown method lowerAscii()"),
    ("method-wrong-receiver", "token.auth_time.startsWith('a')", "no overload of startsWith()"),
    ("method-wrong-argument", "token.sub.startsWith(1)", "startsWith() needs a string argument"),
    ("timezone-argument", "now.getHours('Europe/Paris') > 1", "no overload of getHours()"),
    ("size-of-int", "size(token.auth_time) > 0", "size() needs a string, bytes, list or map"),
    ("conversion-overload", "int(now) > 0", "no overload of int() for timestamp"),
    ("string-of-bool", "string(token.present) == 'true'", "no overload of string() for bool"),
    ("bad-regex", "token.sub.matches('[')", "invalid regular expression '['"),
    ("bad-timestamp", "now > timestamp('yesterday')", "invalid timestamp 'yesterday'"),
    ("bad-duration", "now - duration('ages') < now", "invalid duration 'ages'"),
    ("duplicate-map-key", "{'a': 1, 'a': 2}.size() == 1", "duplicate map key 'a'"),
    ("message-construction", "Foo{a: 1} == Foo{a: 1}", "message construction is not supported"),
    ("has-needs-select", "has(token)", "syntax error"),
    ("macro-simple-name", "token.scopes.all(1, true)", "syntax error"),
    ("predicate-not-bool", "token.scopes.exists(s, s)", "the predicate of exists() must be a bool"),
    ("iterate-string", "token.sub.all(c, c == 'a')", "all() needs a list or a map"),
    ("optional-syntax", "token.claims.?x == 1", "syntax error"),
    ("empty", "  ", "must be a non-empty CEL expression"),
]


@pytest.mark.parametrize(("source", "fragment"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_compile_error(source: str, fragment: str) -> None:
    with pytest.raises(CelCompileError) as info:
        compile_condition(source, ENV)
    assert fragment in info.value.message


@pytest.mark.parametrize("source", [
    "token.sub == 'alice' && token.present",
    "has(token.claims.department) && token.claims.department == 'finance'",
    "token.claims.level > 3 || token.claims.admin == true",   # dyn compares with anything
    "'admin' in token.scopes && size(token.actors) <= 1",
    "token.scopes.exists(s, s.startsWith('invoices:'))",
    "token.authorization_details.exists(d, d.type == 'x' && d.max_amount >= 5)",
    "[1, 2].all(token, token > 0)",   # a macro variable shadows a declared one
    "action.params.amount <= 5000.0 && action.params.amount > 0",   # double vs int compares
    "action.params['note'].contains('x') || action.name == ''",
    "request.query.debug == '1' || !('debug' in request.query)",
    "request.params.invoice_id.matches('^INV-[0-9]+$')",
    "now.getHours() >= 8 && now - duration('1h') < now && now > timestamp('2020-01-01T00:00:00Z')",
    "token.auth_time + 300 > 1000 && -token.auth_time < 0 && 7 % 2 == 1",
    "(token.present ? token.sub : 'nobody') != ''",
    "{'a': 1}['a'] == 1 && [1, 2][0] == 1 && 1u < 2u && b'x' == bytes('x')",
    "token.claims.level",   # a dyn result is checked at run time
    "token.actors.map(a, a.size()).all(n, n > 0) && token.actors.filter(a, a != '').size() >= 0",
    "-9223372036854775808 < 0 && 0x10 == 16 && 1e3 == 1000.0 && r'a\\d' != '' && '''x''' == 'x'",
])
def test_valid_condition_compiles(source: str) -> None:
    c = compile_condition(source, ENV)
    assert c.source == source
    runtime.compile(c.rewritten)  # the rewritten source is valid CEL


# ---- the rewrite must not change the meaning ------------------------------------------------

TOKEN = {"present": True, "sub": "alice", "scopes": ["a", "invoices:read"], "auth_time": 100,
         "claims": {"department": "finance", "level": 4, "nested": {"x": [1, 2]}},
         "actors": ["spiffe://e.org/agent"],
         "authorization_details": [{"type": "x", "max_amount": 10}]}
ACTIVATIONS = [
    {"token": TOKEN, "action": {"name": "a", "params": {"amount": 4800.0, "note": "xy"}},
     "request": {"method": "POST", "query": {"debug": "1"}, "params": {"invoice_id": "INV-1"}},
     "now": datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone.utc)},
    {"token": {**TOKEN, "claims": {}, "scopes": []},
     "action": {"name": "", "params": {}},
     "request": {"method": "GET", "query": {}, "params": {}}},
]
SOURCES = [
    "token.claims.department == 'finance'",
    "has(token.claims.department) && token.claims.department == 'finance'",
    "has(token.claims.department) || token.sub == 'alice'",
    "token.claims.department == 'finance' || true",
    "false && token.claims.department == 'x'",
    "token.claims.nested.x[1] == 2",
    "token.claims.nested.x[5] == 2",
    "has(token.claims.nested.x)",
    "'invoices:read' in token.scopes",
    "token.scopes.exists(s, s == 'a')",
    "token.authorization_details.exists(d, d.max_amount >= 10)",
    "token.authorization_details[0].max_amount == 10",
    "action.params.amount <= 5000.0",
    "has(action.params.amount) ? action.params.amount > 1.0 : false",
    "request.query.debug == '1'",
    "size(request.query) == 1",
    "request.params.invoice_id.startsWith('INV')",
    "now.getHours() == 12",
    "has(token.sub) && token.present",
    "[token.sub, 'b'].exists(x, x == 'alice')",
    "{'k': token.sub}.k == 'alice'",
    "token.claims.level > 3",
]


def _lookup(act: dict[str, Any], ref: Ref) -> Any:
    """The reference semantics of a flat variable over a nested activation."""
    if ref.root not in act:
        return MISSING
    v: Any = act[ref.root]
    steps = ref.steps[:-1] if ref.has else ref.steps
    for s in steps:
        if isinstance(v, dict) and s in v:
            v = v[s]
        elif isinstance(v, list) and type(s) is int and 0 <= s < len(v):
            v = v[s]
        else:
            return MISSING
    if ref.has:
        return ref.steps[-1] in v if isinstance(v, dict) else MISSING
    return v


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("act", range(len(ACTIVATIONS)))
def test_rewrite_preserves_meaning(source: str, act: int) -> None:
    activation = ACTIVATIONS[act]
    c = compile_condition(source, ENV)
    try:
        expected: Any = runtime.compile(source).execute(activation)
    except Exception:  # noqa: BLE001
        expected = "error"
    got = c.run(lambda ref: _lookup(activation, ref))
    assert (got if isinstance(got, bool) else "error") == expected


def test_one_flat_variable_per_reference() -> None:
    c = compile_condition("token.sub == 'a' || token.sub == 'b' || has(token.claims.x)", ENV)
    assert [r.text for r in c.refs] == ["token.sub", "has(token.claims.x)"]
    assert c.refs == (Ref("token", ("sub",), False, "token.sub"),
                      Ref("token", ("claims", "x"), True, "has(token.claims.x)"))
    assert "token" not in c.rewritten


def test_flat_names_avoid_macro_variables() -> None:
    c = compile_condition("[1].all(_p0, _p0 > 0) && token.sub == 'a'", ENV)
    assert c.names and not c.names[0].startswith("_p0")
    assert c.run(lambda ref: "a") is True


# ---- run time ---------------------------------------------------------------------------------


def test_missing_value_is_an_error_naming_the_reference() -> None:
    c = compile_condition("token.claims.department == 'finance'", ENV)
    assert c.run(lambda ref: MISSING) == "no value for token.claims.department"


def test_errors_are_absorbed_as_cel_says() -> None:
    assert compile_condition("false && token.claims.x == 1", ENV).run(lambda r: MISSING) is False
    assert compile_condition("token.claims.x == 1 || true", ENV).run(lambda r: MISSING) is True


@pytest.mark.parametrize(("source", "value", "fragment"), [
    ("token.claims.level > 3", "high", "TypeError"),
    ("token.claims.level", 3, "returned int"),
    ("token.claims.level / 0 == 1", 3, "ZeroDivisionError"),
    ("token.claims.level + 1 > 0", 9223372036854775807, "OverflowError"),
])
def test_runtime_errors_are_messages(source: str, value: Any, fragment: str) -> None:
    got = compile_condition(source, ENV).run(lambda ref: value)
    assert isinstance(got, str) and fragment in got


def test_run_never_raises() -> None:
    def boom(ref: Ref) -> Any:
        raise RuntimeError("resolver bug")
    got = compile_condition("token.sub == 'a'", ENV).run(boom)
    assert isinstance(got, str) and "resolver bug" in got
    got = compile_condition("token.sub == 'a'", ENV).run(lambda ref: "\ud800")
    assert isinstance(got, str)  # a lone surrogate cannot be converted: an error, not a crash


@pytest.mark.parametrize(("value", "expected"), [
    ("a", "a"), (True, True), (None, None), (1.5, 1.5), (7, 7),
    (2 ** 63, float(2 ** 63)), (-(2 ** 63) - 1, float(-(2 ** 63) - 1)),
    (Decimal("4800.10"), 4800.1), (Decimal("NaN"), MISSING),
    ((1, "a"), [1, "a"]), (frozenset({"b", "a"}), ["a", "b"]),
    (MappingProxyType({"a": (1, MappingProxyType({"b": Decimal(2)}))}), {"a": [1, {"b": 2.0}]}),
])
def test_to_cel(value: Any, expected: Any) -> None:
    assert to_cel(value) == expected
    assert type(to_cel(value)) is type(expected)
