"""Properties of the document loaders: any YAML text or environment override gives a Config or a
ConfigError (never another exception), any policy document gives a CompiledPolicy or a
ConfigError. Inputs are arbitrary text, arbitrary YAML-shaped values, and random edits of the
real example documents (which reach the deep checks that random text never does)."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, parse_config
from proxy.core.policy import CompiledPolicy, compile_policy
from proxy.errors import ConfigError
from tests.factories import DEFAULT_POLICY
from tests.fuzz.strategies import JSONISH, mutated

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = yaml.safe_load((ROOT / "config" / "sidecar.example.yaml").read_text())
EXAMPLE_POLICY = yaml.safe_load((ROOT / "config" / "policy.example.yaml").read_text())
TOKENS_POLICY = {
    "version": 1, "revision": "r1",
    "authentication": [{"paths": ["/api/**"], "methods": ["POST"], "token": "required",
                        "binding": "dpop"}],
    "rules": [{"id": "alice", "effect": "allow",
               "from": {"subjects": [{"issuer": "https://idp", "sub": "alice"}],
                        "actors": ["spiffe://example.org/agent"], "scopes": ["a"]},
               "require": {"peer_is": "actor", "max_delegation_depth": 2,
                           "acr_values": ["mfa"], "max_auth_age_s": 60},
               "to": [{"paths": ["/api/{id}/**"], "methods": ["GET", "POST"]}],
               "shadow": False}],
}
SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_YAML_PIECES = st.lists(st.sampled_from([
    "listener:", "\n", "  ", "port: ", "8443", "-1", "[", "]", "{", "}", ",", ":", "- ", "&a ", "*a",
    "!!binary ", "!!python/object:os.system ", "!!set ", "? ", "'", '"', "#", "|", ">", "~", "null",
    ".nan", ".inf", "1e400", "0x10", "0o7", "2001-12-14", "yes", "é", "\t", "\x00", "\ud800",
    "---", "...", "%YAML 1.1", "identity:", "upstream:", "policy:", "tokens:", "dpop:", "url: ",
    "http://127.0.0.1:1", "unix:", "trust_domains:", "name: ", "example.org",
]), max_size=40).map("".join)

# nesting around the bound (64) and past PyYAML's own recursion limit (~500: a RecursionError)
_DEPTH = st.sampled_from([1, 63, 64, 65, 66, 200, 600])


def _dump(doc) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        return repr(doc)


def _parse(text: str, env: dict[str, str] | None = None) -> None:
    try:
        cfg = parse_config(text, env=env or {})
    except ConfigError as err:
        assert err.problems and all(isinstance(p.message, str) for p in err.problems)
        assert len(str(err)) < 200_000
        return
    assert isinstance(cfg, Config)


@SETTINGS
@given(st.one_of(st.text(max_size=200), _YAML_PIECES,
                 _DEPTH.map(lambda n: "[" * n + "]" * n),
                 _DEPTH.map(lambda n: "{a: " * n + "1" + "}" * n),
                 st.integers(min_value=0, max_value=400).map(lambda n: "a:\n" + "".join(
                     " " * (i + 1) + "b:\n" for i in range(n)))))
def test_any_yaml_text_gives_a_config_or_a_config_error(text: str) -> None:
    _parse(text)


@SETTINGS
@given(st.one_of(JSONISH, mutated(EXAMPLE_CONFIG, rounds=4)))
def test_any_yaml_document_gives_a_config_or_a_config_error(doc) -> None:
    _parse(_dump(doc))


@SETTINGS
@given(st.dictionaries(
    st.one_of(st.sampled_from(["PORTCULLIS_LISTENER__PORT", "PORTCULLIS_LISTENER__MAX_BODY_BYTES",
                               "PORTCULLIS_TOKENS__DPOP__MAX_PROOF_BYTES", "PORTCULLIS___X",
                               "PORTCULLIS_LISTENER__PORT__X", "PORTCULLIS_IDENTITY__TRUST_DOMAINS",
                               "PORTCULLIS_POLICY__MODE", "PORTCULLIS_X__", "PORTCULLIS_A__B__C__D"]),
              st.text(max_size=30).map(lambda s: "PORTCULLIS_" + s)),
    st.one_of(st.text(max_size=30), _YAML_PIECES,
              _DEPTH.map(lambda n: "[" * n)),
    max_size=4))
def test_any_environment_override_gives_a_config_or_a_config_error(env: dict[str, str]) -> None:
    _parse(_dump(EXAMPLE_CONFIG), env)


_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_yaml_alias_bomb_config_is_refused_before_anything_walks_it() -> None:
    # 9^9 values if anything expanded it; an error message printing it took minutes and gigabytes
    try:
        parse_config(_BOMB + "listener: {port: *i}\n", env={})
    except ConfigError as err:
        assert "document too large" in str(err) and len(str(err)) < 1000
        return
    raise AssertionError("accepted")


def test_yaml_alias_bomb_policy_is_refused_before_the_compiler_walks_it() -> None:
    from proxy.runtime.inputs import parse_policy_file

    text = _BOMB + "version: 1\nrules: [{id: r, effect: allow, from: {workloads: [*i]}, to: []}]\n"
    try:
        parse_policy_file(text.encode(), "0" * 64, source="p", trust_domains=frozenset({"example.org"}))
    except ConfigError as err:
        assert "document too large" in str(err) and len(str(err)) < 1000
        return
    raise AssertionError("accepted")


def _compile(doc) -> None:
    try:
        got = compile_policy(doc, source="fuzz", revision="r0",
                             known_trust_domains=frozenset({"example.org", "partner.org"}))
    except ConfigError as err:
        assert err.problems and all(isinstance(p.message, str) for p in err.problems)
        return
    assert isinstance(got, CompiledPolicy) and got.rules


@SETTINGS
@given(st.one_of(JSONISH, mutated(DEFAULT_POLICY), mutated(TOKENS_POLICY), mutated(EXAMPLE_POLICY)))
def test_any_policy_document_gives_a_compiled_policy_or_a_config_error(doc) -> None:
    _compile(doc)


@SETTINGS
@given(st.one_of(_YAML_PIECES, st.text(max_size=200), mutated(EXAMPLE_POLICY).map(_dump),
                 _DEPTH.map(lambda n: "version: 1\nrules: " + "[" * n + "]" * n)))
def test_any_policy_yaml_gives_a_compiled_policy_or_a_config_error(text: str) -> None:
    # the loader of policy files (and, the same way, of policy bundles): a RecursionError here
    # used to escape the refresher (never counted as a failed refresh, nor as a load error)
    from proxy.runtime.inputs import parse_policy_file

    try:
        got = parse_policy_file(text.encode("utf-8", "surrogatepass"), "0" * 64, source="fuzz",
                                trust_domains=frozenset({"example.org"}))
    except ConfigError:
        return
    assert isinstance(got, CompiledPolicy)


# --------------------------------------------------------------------------------------------
# JSON documents take the JSON parser (JSON is YAML; PyYAML is seconds slower on big policies)
# --------------------------------------------------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=5))
def test_a_json_document_reads_as_its_json_value(doc: dict) -> None:
    import json

    from proxy.config import yaml_document
    for text in (json.dumps(doc), json.dumps(doc, indent=2), "\n  " + json.dumps(doc)):
        assert yaml_document(text) == doc


def test_json_and_yaml_spellings_of_a_policy_compile_alike() -> None:
    import json

    from proxy.config import yaml_document
    as_yaml = yaml.safe_dump(DEFAULT_POLICY, sort_keys=False)
    assert yaml_document(json.dumps(DEFAULT_POLICY)) == yaml_document(as_yaml) == DEFAULT_POLICY


def test_brace_text_that_is_not_strict_json_is_still_yaml() -> None:
    from proxy.config import yaml_document
    assert yaml_document("{a: 1, b: [x, y]}") == {"a": 1, "b": ["x", "y"]}
    assert yaml_document('{"a": NaN}') == {"a": "NaN"}  # never a float NaN from the JSON side
    try:
        yaml_document('{"a": [1,')
    except ValueError as err:
        assert "not valid YAML" in str(err)
    else:
        raise AssertionError("accepted")


def test_the_value_bound_grows_with_the_text_but_not_with_aliases() -> None:
    import json

    from proxy.config import MAX_YAML_VALUES, yaml_document
    big = {"rules": [{"id": f"r{i}", "n": i} for i in range(MAX_YAML_VALUES // 4)]}  # ~125k values
    for text in (json.dumps(big), yaml.safe_dump(big)):
        assert yaml_document(text) == big
    try:  # the alias bomb is a few hundred characters: the bound stays ~MAX_YAML_VALUES
        yaml_document(_BOMB)
    except ValueError as err:
        assert "document too large" in str(err)
    else:
        raise AssertionError("accepted")


def test_every_policy_reader_refuses_the_alias_bomb(tmp_path) -> None:
    # one bounded reader (config.compile_policy_bytes) behind the sidecar's file and bundle, the
    # control plane's validation of published sources, its own policy, `bundle build` and
    # `policy test` / `policy explain`
    from proxy.bundles.cli import _policy_compiles
    from proxy.controlplane.server import parse_api_policy
    from proxy.controlplane.store import validate_files
    from proxy.policytools import load_cases
    from proxy.policytools import load_policy as load_policy_file
    from proxy.runtime.policy_load import load_policy

    text = (_BOMB + "version: 1\nrules: [{id: r, effect: allow, from: {workloads: [*i]}, "
            "to: []}]\n").encode()
    tds = frozenset({"example.org"})
    problems = validate_files({"policy.yaml": text}, revision=1, trust_domains=tds,
                              max_revocation_entries=None)
    assert any("document too large" in p["message"] for p in problems), problems
    (tmp_path / "policy.yaml").write_bytes(text)
    (tmp_path / "cases.yaml").write_bytes(text)
    for load in (lambda: parse_api_policy(text, "0" * 64, source="p", trust_domains=tds),
                 lambda: load_policy(text, source="p", revision="r", trust_domains=tds),
                 lambda: load_policy_file(tmp_path / "policy.yaml"),
                 lambda: load_cases(tmp_path / "cases.yaml")):
        try:
            load()
        except ConfigError as err:
            assert "document too large" in str(err) and len(str(err)) < 1000
        else:
            raise AssertionError("accepted")
    assert _policy_compiles(text, "policy.yaml", 1) is False


def test_the_control_plane_config_is_bounded_like_the_sidecars() -> None:
    from proxy.controlplane.config import parse_config as parse_cp_config
    try:
        parse_cp_config(_BOMB + "listener: {port: *i}\n", env={})
    except ConfigError as err:
        assert "document too large" in str(err) and len(str(err)) < 1000
    else:
        raise AssertionError("accepted")


def test_a_policy_that_is_not_utf8_names_its_source() -> None:
    from proxy.config import policy_document
    try:
        policy_document(b"version: 1\nrules: [\xff]\n", source="bundle@3/policy.yaml")
    except ConfigError as err:
        assert str(err).startswith("bundle@3/policy.yaml: not UTF-8")
    else:
        raise AssertionError("accepted")


# -- config._strict_json: a policy read piece by piece, exactly as json.loads reads it ----------

_REFUSED = object()


def _loads(text: str):
    """json.loads as the sidecar calls it, or _REFUSED."""
    import json

    from proxy.config import _no_constant
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return _REFUSED


_JSON_NOISE = st.sampled_from(["", " ", "\n", "\t", "\r\n", ",", ":", "]", "}", "[", "{", '"', "x",
                               "NaN", "1", "\ufeff", "\x0b", "\u00a0", "[1,]", '{"a":1,}', "//"])


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), JSONISH, max_size=5), st.booleans(),
       st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), _JSON_NOISE), max_size=3),
       st.sampled_from([None, 0, 2]))
def test_the_piecewise_json_reader_reads_what_json_loads_reads(doc, as_list, edits, indent) -> None:
    """The same value for every text json.loads reads (duplicate keys included) and `_NOT_JSON`
    for every text it refuses, whatever the whitespace, with random bytes spliced in."""
    import json

    from proxy.config import _NOT_JSON, _strict_json
    if as_list:  # the shape of a policy: top-level members that are arrays
        doc = {k: [v, v] if i % 2 else [] for i, (k, v) in enumerate(doc.items())}
    text = json.dumps(doc, indent=indent, allow_nan=True)
    for pos, piece in edits:
        pos %= len(text) + 1
        text = text[:pos] + piece + text[pos:]
    expected = _loads(text)
    got = _strict_json(text)
    if expected is _REFUSED:
        assert got is _NOT_JSON, text
    else:
        assert got == expected and type(got) is type(expected), text


def test_the_piecewise_json_reader_refuses_what_json_loads_refuses() -> None:
    from proxy.config import _NOT_JSON, _strict_json
    for text in ('{"a": [1, 2,]}', '{"a": [1 2]}', '{"a": 1,}', '{"a" 1}', '{a: 1}', '{"a": 1} x',
                 '{"a": 1}}', '{"a": [1, NaN]}', '{"a": Infinity}', '{"a": [', '{"a": [1,',
                 '{"a": [1]', '{"a"', "{", '{"a": [1], }', '\ufeff{"a": 1}', '{"a": [-]}',
                 '{"a": "\x01"}', '{"a": [1 x2]}', '{"a": [1 ;2]}', '{"a": 1 x"b": 2}',
                 '{"a" x: 1}', '{"a" x1}', '{"a": [1]x "b": 2}', '{"a": [' + "[" * 100_000 + "]" * 100_000 + "]}"):
        assert _strict_json(text) is _NOT_JSON, text
        assert _loads(text) is _REFUSED, text
    assert _strict_json(' {"a": [ ], "b" : [1 , {"c": [2]}] ,"a": {} } \n') == {"a": {}, "b": [1, {"c": [2]}]}
    assert _strict_json("{}") == {} and _strict_json('{"a": []}') == {"a": []}
