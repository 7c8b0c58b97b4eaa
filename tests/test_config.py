"""Sidecar configuration: the example documents and loads every key; problems name their path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, load_config, parse_config
from proxy.core.schema import field_docs
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "sidecar.example.yaml"

MINIMAL = """
identity:
  svid_file: svid.pem
  svid_key_file: svid_key.pem
  trust_domains: [{name: example.org, bundle_file: bundle.pem}]
upstream: {url: "http://127.0.0.1:8080"}
policy: {file: policy.yaml}
"""


def test_example_config_loads():
    cfg = load_config(EXAMPLE, env={})
    assert isinstance(cfg, Config)
    assert cfg.listener.port == 8443 and cfg.policy.mode == "enforce"
    assert cfg.policy.file == str(EXAMPLE.parent / "policy.example.yaml")


def test_example_config_mentions_every_key_with_a_comment():
    lines = EXAMPLE.read_text().splitlines()
    for path, _doc in field_docs(Config):
        key = path.rsplit(".", 1)[-1]
        # a key may be shown commented out when it is an alternative (policy.bundle vs file)
        at = [i for i, ln in enumerate(lines)
              if re.match(rf"\s*(#\s*)?(- )?{re.escape(key)}:", ln)]
        assert at, f"{path} is not in the example config"
        # a comment on the key's line, or (for sections) on the line above it
        assert any("#" in lines[i].split(":", 1)[1] or lines[i].lstrip().startswith("#")
                   or lines[i - 1].lstrip().startswith("#") for i in at), \
            f"{path} has no comment"


def test_example_policy_compiles_against_example_config():
    from proxy.runtime.inputs import parse_policy_file

    cfg = load_config(EXAMPLE, env={})
    data = Path(cfg.policy.file).read_bytes()
    policy = parse_policy_file(data, "0" * 64, source=cfg.policy.file,
                               trust_domains=cfg.trust_domain_names)
    assert policy.revision == "example-1" and len(policy.rules) >= 3


def test_defaults_and_relative_paths():
    cfg = parse_config(MINIMAL, base_dir=Path("/etc/portcullis"), env={})
    assert cfg.identity.svid_file == "/etc/portcullis/svid.pem"
    assert cfg.identity.trust_domains[0].bundle_file == "/etc/portcullis/bundle.pem"
    assert cfg.server.workers == 1 and cfg.audit.on_full == "backpressure"


def problems(text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, env=env or {})
    return [str(p) for p in ei.value.problems]


def test_every_problem_is_reported_with_its_path():
    text = MINIMAL + """
listener: {port: 70000, bogus: 1, tls_min_version: "1.1"}
audit: {on_full: drop}
"""
    got = problems(text)
    assert any(p.startswith("listener.port:") for p in got)
    assert any(p.startswith("listener.bogus: unknown key") for p in got)
    assert any(p.startswith("listener.tls_min_version:") for p in got)
    assert any(p.startswith("audit.on_full:") for p in got)
    assert len(got) == 4


@pytest.mark.parametrize("text,path", [
    ("upstream: {url: 'http://x'}\npolicy: {file: p}", "identity: is required"),
    (MINIMAL.replace("http://127.0.0.1:8080", "https://x:1"), "upstream.url:"),
    (MINIMAL.replace("http://127.0.0.1:8080", "http://x:1/prefix"), "upstream.url:"),
    (MINIMAL.replace("trust_domains: [{name: example.org, bundle_file: bundle.pem}]",
                     "trust_domains: []"), "identity.trust_domains: must not be empty"),
    (MINIMAL.replace("name: example.org", "name: Example.ORG"), "identity.trust_domains[0].name:"),
    (MINIMAL + "server: {workers: 0}", "server.workers:"),
    (MINIMAL + "listener: {port: yes}", "listener.port:"),
    (MINIMAL + "admin: {enabled: 1}", "admin.enabled:"),
])
def test_invalid_values_name_their_path(text, path):
    assert any(p.startswith(path) for p in problems(text)), problems(text)


def test_duplicate_trust_domain_is_an_error():
    text = MINIMAL.replace(
        "trust_domains: [{name: example.org, bundle_file: bundle.pem}]",
        "trust_domains: [{name: a.org, bundle_file: a}, {name: a.org, bundle_file: b}]")
    assert any("trust domain listed twice" in p for p in problems(text))


def test_env_overrides_replace_values_and_are_typed():
    cfg = parse_config(MINIMAL, env={"PORTCULLIS_LISTENER__PORT": "9443",
                                     "PORTCULLIS_POLICY__MODE": "shadow",
                                     "PORTCULLIS_IDENTITY__WATCH_INTERVAL_S": "0.5",
                                     "PORTCULLIS_SOMETHING": "ignored (no __)"})
    assert cfg.listener.port == 9443 and cfg.policy.mode == "shadow"
    assert cfg.identity.watch_interval_s == 0.5


def test_env_override_of_unknown_key_is_an_error():
    got = problems(MINIMAL, env={"PORTCULLIS_LISTENER__PROT": "1"})
    assert got == ["listener.prot: unknown key (known keys: address, backlog, handshake_timeout_s, "
                   "header_timeout_s, idle_timeout_s, max_body_bytes, max_connections, max_header_bytes, "
                   "max_headers, max_request_line_bytes, port, tls_min_version)"]


def test_env_override_with_bad_value_names_the_variable():
    got = problems(MINIMAL, env={"PORTCULLIS_LISTENER__PORT": "not-a-port"})
    assert got == ["listener.port: must be an integer; got 'not-a-port'"]


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("a: [", env={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- a\n- b", env={})


def test_config_check_cli_exit_2_with_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: {port: -1}\nupstream: {url: ftp://x}\n")
    r = subprocess.run([sys.executable, "-m", "proxy", "config", "check", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "listener.port:" in r.stderr and "upstream.url:" in r.stderr
    assert "identity: is required" in r.stderr and "policy: is required" in r.stderr
    assert r.stdout == ""


def test_config_check_cli_reports_unreadable_inputs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(MINIMAL)
    r = subprocess.run([sys.executable, "-m", "proxy", "config", "check", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "own SVID" in r.stderr and "trust bundle example.org" in r.stderr
    assert "policy" in r.stderr


def test_several_workers_with_token_issuers_warn_that_dpop_replay_detection_is_per_worker():
    from proxy.runtime.supervisor import replay_scope_warning
    plain = parse_config(MINIMAL, env={})
    tokens = parse_config(MINIMAL + """
tokens:
  issuers: [{issuer: "https://idp", audiences: [a], jwks_file: jwks.json}]
""", env={})
    assert replay_scope_warning(plain, 4) is None
    assert replay_scope_warning(tokens, 1) is None
    warning = replay_scope_warning(tokens, 2)
    assert warning and "per worker process" in warning and "--workers 2" in warning
