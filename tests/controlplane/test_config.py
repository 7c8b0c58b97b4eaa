"""Control plane configuration (every problem with its path, the example documents every key), the
shipped API policy, revocation change requests and the CLI wiring."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from proxy.controlplane import revocations as rv
from proxy.controlplane.api import etag_matches, parse_prefer_wait
from proxy.controlplane.cli import cmd_check, cmd_serve, register
from proxy.controlplane.config import ControlPlaneConfig, load_config, parse_config
from proxy.core.model import RequestContext
from proxy.core.policy import compile_policy, evaluate
from proxy.core.schema import field_docs
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import ConfigError
from tests.controlplane.conftest import CP_POLICY, DEPLOYER_ID, REPO, CpEnv

EXAMPLE = REPO / "config" / "controlplane.example.yaml"


def test_the_example_config_loads_and_documents_every_key():
    cfg = load_config(EXAMPLE, env={})
    assert [b.name for b in cfg.bundles] == ["demo"]
    assert cfg.policy.file == str(EXAMPLE.parent / "controlplane-policy.yaml")
    text = EXAMPLE.read_text()
    missing = [path for path, _doc in field_docs(ControlPlaneConfig)
               if not re.search(rf"^\s*(- )?{re.escape(path.split('.')[-1])}:", text, re.M)]
    assert missing == []
    assert all(doc for _path, doc in field_docs(ControlPlaneConfig))


def test_config_problems_are_all_reported_with_their_paths():
    text = """
listener: {port: 70000, colour: red}
identity: {svid_file: a, svid_key_file: b, trust_domains: [{name: Bad..Domain, bundle_file: x}]}
signing: {}
state: {dir: s, keep_revisions: 0}
policy: {file: p}
bundles: [{name: demo}, {name: demo}, {name: "../x"}]
"""
    with pytest.raises(ConfigError) as exc:
        parse_config(text, env={})
    paths = {p.path for p in exc.value.problems}
    assert {"listener.port", "listener.colour", "identity.trust_domains[0].name",
            "signing.key_file", "state.keep_revisions", "bundles[2].name"} <= paths


def test_duplicate_bundle_names_are_refused():
    text = EXAMPLE.read_text().replace("  - name: demo\n", "  - name: demo\n  - name: demo\n", 1)
    with pytest.raises(ConfigError) as exc:
        parse_config(text, env={})
    assert "bundle listed twice: demo" in str(exc.value)


def test_environment_overrides_use_their_own_prefix():
    cfg = parse_config(EXAMPLE.read_text(), env={"PORTCULLIS_CP_LISTENER__PORT": "9555",
                                                 "PORTCULLIS_LISTENER__PORT": "1"})
    assert cfg.listener.port == 9555


def _ctx(spiffe_id: str, method: str, path: str) -> RequestContext:
    return RequestContext(workload=parse_spiffe_id(spiffe_id), workload_uri=spiffe_id,
                          method=method, path=path)


@pytest.mark.parametrize("who,method,path,effect", [
    (DEPLOYER_ID, "POST", "/v1/bundles/demo/publish", "allow"),
    (DEPLOYER_ID, "DELETE", "/v1/bundles/demo/revocations", "allow"),
    (DEPLOYER_ID, "GET", "/v1/fleet", "allow"),
    ("spiffe://example.org/ns/demo/sa/frontend", "GET", "/bundles/demo", "allow"),
    ("spiffe://example.org/ns/demo/sa/frontend", "GET", "/bundles/other", "deny"),
    ("spiffe://example.org/ns/demo/sa/frontend", "POST", "/v1/status", "allow"),
    ("spiffe://example.org/ns/demo/sa/frontend", "POST", "/v1/bundles/demo/publish", "deny"),
    ("spiffe://example.org/ns/billing/sa/api", "POST", "/v1/bundles/demo/rollback", "deny"),
    ("spiffe://example.org/ns/platform/sa/other", "DELETE", "/v1/bundles/demo/revocations",
     "deny"),
])
def test_the_shipped_api_policy(who: str, method: str, path: str, effect: str):
    policy = compile_policy(yaml.safe_load(CP_POLICY.read_text()), revision="t",
                            known_trust_domains=frozenset({"example.org"}))
    assert evaluate(policy, _ctx(who, method, path)).outcome.effect == effect


@pytest.mark.parametrize("values,wait", [
    (["wait=10"], 10.0), (["respond-async, wait=5"], 5.0), (['WAIT="7"; x=y'], 7.0),
    (["wait=-1"], 0.0), (["wait=abc"], 0.0), (["wait"], 0.0), ([], 0.0),
    (["handling=lenient", "wait=3"], 3.0),
])
def test_prefer_wait_parsing(values: list[str], wait: float):
    assert parse_prefer_wait(values) == wait


@pytest.mark.parametrize("header,match", [
    ('"abc"', True), ('W/"abc"', True), ('"x", "abc"', True), ("*", True), ("abc", True),
    ('"abcd"', False), (None, False), ("", False),
])
def test_if_none_match_comparison(header: str | None, match: bool):
    assert etag_matches(header, '"abc"') is match


def test_revocation_changes_apply_and_render_canonically():
    add, problems = rv.parse({"jtis": ["b", "a", "a"], "subjects": [{"iss": "i", "sub": "s"}]},
                             require_entry=True)
    assert problems == []
    rendered = rv.render(add)
    assert rendered == rv.render(rv.union(rv.EMPTY, add))
    assert b'"jtis": [\n    "a",\n    "b"\n  ]' in rendered
    assert rv.difference(add, add) == rv.EMPTY


def test_revocation_limits():
    _value, problems = rv.parse({"jtis": ["a", "b", "c"]}, max_entries=2)
    assert [p.message for p in problems] == ["3 entries, at most 2"]


def test_cli_registers_control_plane_serve_and_check():
    parser = argparse.ArgumentParser(prog="portcullis")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["control-plane", "serve", "--config", "cp.yaml"])
    assert args.func is cmd_serve and args.config == "cp.yaml"
    args = parser.parse_args(["control-plane", "check", "cp.yaml"])
    assert args.func is cmd_check


def test_cli_check_accepts_a_good_config_and_lists_problems_of_a_bad_one(
        env: CpEnv, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    good = env.write_config()
    assert cmd_check(argparse.Namespace(file=str(good))) == 0
    assert "signing key" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("keep_revisions: 10", "keep_revisions: -1"))
    assert cmd_check(argparse.Namespace(file=str(bad))) == 2
    assert "state.keep_revisions" in capsys.readouterr().err


def test_cli_check_reports_a_missing_signing_key(env: CpEnv, capsys: pytest.CaptureFixture[str]):
    (env.root / "signing.key").unlink()
    assert cmd_check(argparse.Namespace(file=str(env.write_config()))) == 2
    assert "signing.key_file: cannot read" in capsys.readouterr().err
