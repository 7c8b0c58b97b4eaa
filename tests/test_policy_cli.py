"""`portcullis policy test` and `portcullis policy explain` (proxy.policytools.cli), run the way
the command runs them: parse arguments, call the command, check output and exit code."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

from proxy.policytools import build_token, merge, simulate
from proxy.policytools.cli import register

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
AGENT = "spiffe://example.org/agents/expense-assistant"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="portcullis")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_example_policy_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "test", str(CONFIG / "policy-tests"))
    lines = out.splitlines()
    assert code == 0, out
    assert lines[0].startswith(f"policy {CONFIG / 'policy.example.yaml'} (revision example-1")
    assert lines[-1] == f"{len(lines) - 2} passed, 0 failed"
    cases = {line.split(": ")[1]: line for line in lines[1:-1]}
    assert all(line.startswith("PASS  expense.yaml: ") for line in cases.values())
    # the cases the product has to carry
    assert cases["someone else's invoice (not in alice's consent) is denied"].endswith(
        "deny (no_matching_rule) rule null")
    assert cases["$999,999 is denied"].endswith(
        "deny (denied_by_rule) rule invoice-over-10000-needs-two-approvals")
    assert cases["alice's agent approves INV-8831 for $4,800"].endswith(
        "allow (allowed) rule expense-agent-approves-invoice")
    assert cases["$7,000 with a password login steps up to MFA"].endswith(
        "step_up (step_up_required) rule expense-agent-approves-large-invoice")


def _write_cases(path: Path, cases: list[dict], **top: object) -> None:
    path.write_text(yaml.safe_dump({**top, "cases": cases}))


def test_failures_are_reported_and_exit_1(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(CONFIG / "policy.example.yaml", tmp_path / "policy.yaml")  # the default policy
    frontend = {"workload": "spiffe://example.org/ns/demo/sa/frontend", "method": "GET",
                "path": "/api/items"}
    _write_cases(tests / "a.yaml", [
        {"name": "reads", "request": frontend, "expect": {"decision": "allow",
                                                          "rule": "frontend-reads-api"}},
        {"name": "wrong expectation", "request": frontend,
         "expect": {"decision": "deny", "rule": None, "code": "no_matching_rule"}},
        {"name": "typo", "request": {**frontend, "methd": "GET"},
         "expect": {"decision": "allow"}},
        {"name": "bad decision", "request": frontend, "expect": {"decision": "permit"}},
    ])
    code, out, _ = run(capsys, "policy", "test", str(tests), "--verbose")
    assert code == 1
    assert "PASS  a.yaml: reads: allow (allowed) rule frontend-reads-api" in out
    assert ("FAIL  a.yaml: wrong expectation: decision allow, expected deny; rule "
            "frontend-reads-api, expected null; code allowed, expected no_matching_rule "
            "[got allow (allowed) rule frontend-reads-api]") in out
    assert "FAIL  a.yaml: typo: bad case: request: unknown keys methd" in out
    assert "FAIL  a.yaml: bad decision: bad case: expect.decision must be one of" in out
    assert "        to        ok  GET,HEAD /api/**" in out  # --verbose: the trace of a failure
    assert out.splitlines()[-1] == "1 passed, 3 failed"


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "policy", "test", str(tmp_path / "nothing"))
    assert code == 2 and "no such file or directory" in err
    code, _, err = run(capsys, "policy", "test", str(tmp_path))
    assert code == 2 and "no *.yaml test files" in err
    _write_cases(tmp_path / "t.yaml", [{"name": "n", "request": {}, "expect": {}}])
    code, _, err = run(capsys, "policy", "test", str(tmp_path))
    assert code == 2 and "no policy: pass --policy" in err
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({
        "version": 1, "revision": "r", "rules": [
            {"id": "r", "effect": "allow", "from": {"workloads": ["spiffe://e.org/a"]},
             "to": [{"paths": ["/a"]}], "when": "request.nope == 1"}]}))
    code, _, err = run(capsys, "policy", "test", str(tmp_path / "t.yaml"), "--policy",
                       str(tmp_path / "broken.yaml"))
    assert code == 2
    assert "rules[0].when: request has no field 'nope'" in err


def test_file_level_now_and_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "version": 1, "revision": "r", "rules": [
            {"id": "morning", "effect": "allow", "from": {"workloads": ["spiffe://e.org/a"]},
             "to": [{"paths": ["/a"]}], "when": "now.getHours() < 12"}]}))
    _write_cases(tmp_path / "t.yaml", [
        {"name": "at 8", "request": {}, "expect": {"decision": "allow", "rule": "morning"}},
        {"name": "at 18", "request": {"now": 1800036000}, "expect": {"decision": "deny"}},
    ], now=1800000000, defaults={"workload": "spiffe://e.org/a", "path": "/a"})
    code, out, _ = run(capsys, "policy", "test", str(tmp_path / "t.yaml"), "--policy",
                       str(tmp_path))  # a directory: its policy.yaml
    assert code == 0, out
    assert out.splitlines()[-1] == "2 passed, 0 failed"


REQUEST = {
    "workload": AGENT, "method": "POST",
    "path": "/api/invoices/INV-8831/approve?department=finance", "body": {"amount": 7000},
    "token": {"iss": "https://idp.example.org", "sub": "alice", "act": [AGENT],
              "acr": "urn:example:pwd", "department": "finance",
              "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
              "authorization_details": [{"type": "invoice_approval", "invoice_id": "INV-8831",
                                         "max_amount": 20000}]},
}


def test_explain_prints_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", "--policy", str(CONFIG / "policy.example.yaml"),
                       "--now", "1800000000", "--request", json.dumps(REQUEST))
    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == [
        f"request: POST /api/invoices/INV-8831/approve?department=finance from {AGENT}",
        "action: invoice.approve (invoice_id='INV-8831', amount=7000, department='finance')",
        "authentication: token required, binding dpop (authentication[0])",
        f"token: iss=https://idp.example.org sub=alice actors={AGENT} acr=urn:example:pwd "
        "binding=dpop",
        "candidates (index): expense-agent-approves-invoice, "
        "expense-agent-approves-large-invoice, invoice-over-10000-needs-two-approvals",
    ]
    assert "  [5] expense-agent-approves-large-invoice (allow, candidate) -> step_up" in lines
    assert "        require   UP  step-up: acr_values urn:example:mfa" in lines
    assert any(line.startswith("        when      NO  false: action.params.amount <= 5000.0")
               for line in lines)
    assert lines[-1] == ("decision: step_up (step_up_required) rule "
                         "expense-agent-approves-large-invoice (acr_values urn:example:mfa, "
                         "max_age_s None), revision example-1")


def test_explain_json_and_request_file(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "req.yaml").write_text(yaml.safe_dump({**REQUEST, "body": {"amount": 4800}}))
    code, out, _ = run(capsys, "policy", "explain", "--policy", str(CONFIG / "policy.example.yaml"),
                       "--request", f"@{tmp_path / 'req.yaml'}", "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["decision"], doc["code"], doc["rule"], doc["action"]) == \
        ("allow", "allowed", "expense-agent-approves-invoice", "invoice.approve")
    assert doc["params"] == {"invoice_id": "INV-8831", "amount": "4800",
                             "department": "finance"}
    rule = next(r for r in doc["rules"] if r["id"] == "expense-agent-approves-invoice")
    assert rule["result"] == "match" and rule["candidate"] is True
    assert [c["name"] for c in rule["checks"]] == ["to", "workload", "token", "require", "when"]


def test_explain_refused_before_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    req = {**REQUEST, "body": '{"amount": 1, "amount": 2}'}
    code, out, _ = run(capsys, "policy", "explain", "--policy", str(CONFIG / "policy.example.yaml"),
                       "--request", json.dumps(req))
    assert code == 0
    assert out.splitlines()[-1] == "refused before the policy ran (action): deny " \
                                   "(invalid_json_body)"
    code, _, err = run(capsys, "policy", "explain", "--policy", str(CONFIG / "policy.example.yaml"),
                       "--request", json.dumps({"path": "/x"}))
    assert code == 2 and "request.workload" in err


def test_explain_request_is_read_with_the_bounded_reader(capsys: pytest.CaptureFixture[str]) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg"))  # 10**7 values once expanded
    code, _, err = run(capsys, "policy", "explain", "--policy", str(CONFIG / "policy.example.yaml"),
                       "--request", bomb)
    assert code == 2 and "--request is not JSON/YAML: document too large" in err


# ---- the simulation's building blocks ----------------------------------------------------------


def test_merge_and_token() -> None:
    base = {"token": {"iss": "i", "sub": "a", "department": "x"}, "body": {"amount": 1}}
    assert merge(base, {"token": {"department": None}, "body": {"note": "n"}}) == \
        {"token": {"iss": "i", "sub": "a"}, "body": {"amount": 1, "note": "n"}}
    assert merge(base, {"token": None}) == {"body": {"amount": 1}}
    tok = build_token({"iss": "i", "sub": "a", "act": ["x", "y"], "scope": "r w",
                       "cnf": {"jkt": "k"}, "authorization_details": [{"type": "t"}],
                       "department": "d"})
    assert [a.sub for a in tok.actors] == ["x", "y"]
    assert tok.claims["act"] == {"sub": "x", "act": {"sub": "y"}}
    assert tok.scopes == frozenset({"r", "w"}) and tok.cnf_jkt == "k"
    assert tok.claims["department"] == "d" and tok.authorization_details[0]["type"] == "t"


def test_simulate_authentication_stage() -> None:
    from proxy.policytools import load_policy

    policy = load_policy(CONFIG / "policy.example.yaml")
    bearer = merge(REQUEST, {"token": {"cnf": None}})
    assert simulate(policy, bearer, 0).code == "binding_required"
    assert simulate(policy, merge(REQUEST, {"token": None}), 0).code == "token_missing"
    assert simulate(policy, {**REQUEST, "path": "/api/../x"}, 0).stage == "target"
