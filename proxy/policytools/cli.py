"""`portcullis policy test` and `portcullis policy explain`.

    portcullis policy test DIR [--policy FILE|DIR] [--now T] [--verbose]
        Run every *.yaml / *.yml file of DIR (or one file) as test cases (`run_file` in
        `proxy.policytools` describes the format) against the policy: one line per case
        (PASS / FAIL), then "N passed, M failed". --policy defaults to DIR/../policy.yaml, else
        DIR/../policy.example.yaml. A directory policy means its policy.yaml.
    portcullis policy explain --policy FILE --request JSON|@FILE [--now T] [--json]
        Decide one hypothetical request (the same description as a test case's `request`, JSON
        or YAML) and print the trace: the action and parameters, the route's authentication,
        the rules the index selected, every rule's checks (to, workload, token, require, when)
        and the decision.

Exit codes: 0 ok (all cases passed / explained), 1 a case failed, 2 bad input (the policy does
not compile, no test files, an unreadable request).

Wiring (proxy/cli.py): `from proxy.policytools.cli import register; register(sub)` with `sub` the
top-level subparsers; `register` adds the `policy` group. Each command sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from proxy.config import yaml_document
from proxy.errors import ConfigError

PROG = "portcullis policy"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `policy` command group (test, explain) to the top-level subparsers."""
    p = subparsers.add_parser("policy", help="policy tools: test cases, explain a decision")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")

    t = psub.add_parser("test", help="run YAML test cases against a policy (like opa test)")
    t.add_argument("dir", help="directory of *.yaml test files, or one file")
    t.add_argument("--policy", help="policy file or bundle directory (default: DIR/../policy.yaml"
                                    ", else DIR/../policy.example.yaml)")
    t.add_argument("--now", type=float, default=None,
                   help="clock for cases without their own `now` (default: the current time)")
    t.add_argument("-v", "--verbose", action="store_true", help="print the trace of failures")
    t.set_defaults(func=cmd_test)

    e = psub.add_parser("explain", help="decide one hypothetical request and show why")
    e.add_argument("--policy", required=True, help="policy file or bundle directory")
    e.add_argument("--request", required=True,
                   help="the request description as JSON/YAML text, or @FILE")
    e.add_argument("--now", type=float, default=None, help="clock (default: the current time)")
    e.add_argument("--json", action="store_true", help="print the trace as JSON")
    e.set_defaults(func=cmd_explain)
    return p


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _load(path: Path) -> Any:
    from proxy.policytools import load_policy

    try:
        return load_policy(path)
    except ConfigError as exc:
        _err(f"the policy has {len(exc.problems)} problem(s):")
        for line in exc.render().splitlines():
            print(f"  {line}", file=sys.stderr)
        return None


def _default_policy(target: Path) -> Path | None:
    base = (target if target.is_dir() else target.parent).resolve().parent
    for name in ("policy.yaml", "policy.example.yaml"):
        if (base / name).exists():
            return base / name
    return None


# ------------------------------------------------------------------------------------------------
# test
# ------------------------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    from proxy.policytools import CaseResult, load_cases, run_file

    target = Path(args.dir)
    if target.is_dir():
        files = sorted([*target.glob("*.yaml"), *target.glob("*.yml")])
    elif target.is_file():
        files = [target]
    else:
        _err(f"{target}: no such file or directory")
        return 2
    if not files:
        _err(f"{target}: no *.yaml test files")
        return 2
    policy_path = Path(args.policy) if args.policy else _default_policy(target)
    if policy_path is None:
        _err("no policy: pass --policy (nothing at DIR/../policy.yaml or policy.example.yaml)")
        return 2
    policy = _load(policy_path)
    if policy is None:
        return 2
    now = args.now if args.now is not None else time.time()
    print(f"policy {policy.source} (revision {policy.revision}, {len(policy.rules)} rules)")
    results: list[CaseResult] = []
    for f in files:
        try:
            doc = load_cases(f)
        except ConfigError as exc:
            _err(exc.render())
            return 2
        for r in run_file(policy, doc, f.name, now):
            results.append(r)
            print(f"{'PASS' if r.ok else 'FAIL'}  {r.file}: {r.name}: {r.message}")
            if args.verbose and not r.ok and r.got is not None and r.got.ctx is not None:
                from proxy.core.policy import explain

                for line in format_trace(explain(policy, r.got.ctx, now=r.got.now),
                                         policy, r.got.ctx).splitlines():
                    print(f"      {line}")
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


# ------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from proxy.core.policy import explain
    from proxy.policytools import CaseError, simulate

    text = args.request
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _err(f"cannot read {text[1:]}: {exc}")
            return 2
    try:
        request = yaml_document(text)
    except ValueError as exc:
        _err(f"--request is not JSON/YAML: {exc}")
        return 2
    policy = _load(Path(args.policy))
    if policy is None:
        return 2
    now = args.now if args.now is not None else time.time()
    try:
        got = simulate(policy, request, now)
    except CaseError as exc:
        _err(f"bad request description: {exc}")
        return 2
    expl = explain(policy, got.ctx, now=got.now) if got.ctx is not None else None
    if args.json:
        out = {"decision": got.decision, "code": got.code, "rule": got.rule,
               "stage": got.stage, "revision": policy.revision,
               "action": got.ctx.action if got.ctx is not None else None,
               "params": _jsonable(dict(got.ctx.params)) if got.ctx is not None else None}
        if expl is not None:
            out["shadow"] = None if expl.verdict.shadow is None else asdict(expl.verdict.shadow)
            out["candidates"] = [policy.rules[i].id for i in expl.candidates]
            out["rules"] = [asdict(r) for r in expl.rules]
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"request: {request.get('method', 'GET')} {request.get('path')} from "
          f"{request.get('workload')}")
    if expl is None:
        print(f"refused before the policy ran ({got.stage}): {got.decision} ({got.code})")
        return 0
    print(format_trace(expl, policy, got.ctx))
    return 0


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def format_trace(expl: Any, policy: Any, ctx: Any = None) -> str:
    """The text form of an `Explanation` (with the request context's action, authentication
    entry and token when `ctx` is given)."""
    lines = []
    if ctx is not None:
        if ctx.action is not None:
            params = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                               for k, v in ctx.params.items())
            lines.append(f"action: {ctx.action} ({params})")
        else:
            lines.append("action: none")
        auth = policy.authentication_for(ctx.method, ctx.path)
        where = "default" if auth.entry is None else f"authentication[{auth.entry}]"
        lines.append(f"authentication: token {auth.token}, binding {auth.binding} ({where})")
        tok = ctx.token
        if tok is None:
            lines.append("token: none")
        else:
            actors = ",".join(a.sub for a in tok.actors) or "-"
            lines.append(f"token: iss={tok.issuer} sub={tok.subject} actors={actors} "
                         f"acr={tok.acr or '-'} binding={ctx.binding.kind if ctx.binding else '-'}")
    v = expl.verdict
    cands = ", ".join(policy.rules[i].id for i in expl.candidates) or "none"
    lines.append(f"candidates (index): {cands}")
    lines.append("rules:")
    for r in expl.rules:
        mark = "candidate" if r.candidate else "not a candidate"
        shadow = " shadow" if r.shadow else ""
        lines.append(f"  [{r.index}] {r.id} ({r.effect}{shadow}, {mark}) -> {r.result}")
        for c in r.checks:
            status = "ok" if c.ok else "--" if c.ok is None else \
                "UP" if c.detail.startswith("step-up") else "NO"
            lines.append(f"        {c.name:<9} {status:<3} {c.detail}")
    out = v.outcome
    extra = ""
    if out.effect == "step_up":
        extra = f" (acr_values {' '.join(out.acr_values) or '-'}, max_age_s {out.max_age_s})"
    lines.append(f"decision: {out.effect} ({out.code}) rule {out.rule_id or 'null'}{extra}, "
                 f"revision {policy.revision}")
    if v.shadow is not None:
        lines.append(f"shadow (would be): {v.shadow.effect} ({v.shadow.code}) rule "
                     f"{v.shadow.rule_id or 'null'}")
    return "\n".join(lines)
