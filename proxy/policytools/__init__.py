"""Policy tools: load a policy, describe a hypothetical request, decide it as the sidecar would.

Used by `portcullis policy test` and `portcullis policy explain` (`cli`). Everything here reads
files only in `load_policy` / `load_cases`; the rest is pure and reuses `proxy.core`.

A request description (a case's `request`, or `explain --request`), YAML or JSON:

    workload: spiffe://example.org/agents/expense-assistant   # the mTLS peer (required)
    method: POST                          # default GET
    path: /api/invoices/INV-8831/approve?department=finance   # request target (required)
    query: {department: finance}          # optional, instead of ?... in path (string or mapping)
    content_type: application/json        # default application/json when there is a body
    body: {amount: 4800}                  # a mapping/list (sent as JSON) or a string (as is)
    now: 1800000000                       # optional clock (seconds); else the file's, else now
    token:                                # the verified access token's claims (or null: none)
      iss: https://idp.example.org        # required
      sub: alice
      act: [spiffe://example.org/agents/expense-assistant]  # actor subs, current first (or
                                          # the RFC 8693 nested {sub, act: {...}} object)
      scope: "invoices:approve"           # space-separated string or a list
      acr: urn:example:pwd
      amr: [pwd]
      auth_time: 1799999000
      client_id: expense-app
      cnf: {jkt: ...}                     # dpop-bound (or x5t#S256: mtls-bound); none: bearer
      authorization_details: [{type: invoice_approval, invoice_id: INV-8831, max_amount: 5000}]
      department: finance                 # any other claim, as in the JWT

The simulation follows `core.pipeline.authorize` for everything the policy decides, in its
order: the target is canonicalised (`invalid_target`...), the route's `authentication` entry is
applied (`token_missing`, `token_forbidden`, `binding_required` when the token's `cnf` does not
give the binding the route needs; a cnf is taken as proven: the DPoP proof or client certificate
is assumed to match), the action and its parameters are read (`missing_param`, `param_type`,
`invalid_json_body`...), then `evaluate`. Token signatures, issuers' keys, DPoP proofs and peer
certificates are not checked: this tests the policy, not the credentials.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import quote

from proxy.config import compile_policy_bytes, file_revision, yaml_document
from proxy.core.model import Actor, Binding, RequestContext, TokenClaims, Verdict
from proxy.core.paths import canonicalize_target
from proxy.core.policy import CompiledPolicy, evaluate, extract_params
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import ConfigError, InvalidValue, ProxyError

_REQUEST_KEYS = ("workload", "method", "path", "query", "content_type", "body", "now", "token")
_EXPECT_KEYS = ("decision", "rule", "code")
_DECISIONS = ("allow", "deny", "step_up")


class CaseError(ValueError):
    """A request description or expectation that cannot be used (not a policy failure)."""


def policy_file(path: Path) -> Path:
    """A policy file, or the `policy.yaml` of a bundle source directory."""
    return path / "policy.yaml" if path.is_dir() else path


def load_policy(path: Path) -> CompiledPolicy:
    """Read and compile a policy file (or bundle directory); raise ConfigError."""
    f = policy_file(path)
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {f}: {exc.strerror}", source=str(f)) from None
    digest = hashlib.sha256(data).hexdigest()
    return compile_policy_bytes(data, source=str(f), revision=file_revision(digest))


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Simulated:
    """What the sidecar would do: `decision` allow | deny | step_up, the stable `code`, the
    deciding `rule` (None when none), the context the policy saw (None when the request was
    refused before the policy ran) and the verdict (with the shadow outcome)."""

    decision: str
    code: str
    rule: str | None
    ctx: RequestContext | None = None
    verdict: Verdict | None = None
    now: float | None = None
    stage: str = "policy"  # target | authentication | action | policy


def merge(base: Any, over: Any) -> Any:
    """Deep merge of request descriptions: mappings merge (a body too), a null in `over`
    removes the key (`token: null`: no token; `token: {department: null}`: no such claim)."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for k, v in over.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else v
        return out
    return over


def build_token(spec: Mapping[str, Any]) -> TokenClaims:
    """A verified-token value from its claims (see the module docstring)."""
    if not isinstance(spec, Mapping):
        raise CaseError("token must be a mapping of claims (or null)")
    payload = dict(spec)
    iss = payload.get("iss")
    if not isinstance(iss, str) or not iss:
        raise CaseError("token.iss is required (a string)")
    act = payload.get("act")
    actors: list[Actor] = []
    if isinstance(act, list):
        node: dict[str, Any] | None = None
        for sub in reversed(act):
            if not isinstance(sub, str):
                raise CaseError("token.act: a list of actor subs (strings)")
            node = {"sub": sub, **({"act": node} if node is not None else {})}
        payload["act"] = node
        if node is None:
            del payload["act"]
        actors = [Actor(sub=s) for s in act]
    elif isinstance(act, Mapping):
        n: Any = act
        while isinstance(n, Mapping):
            if not isinstance(n.get("sub"), str):
                raise CaseError("token.act: every level needs a string sub")
            actors.append(Actor(n["sub"], n.get("iss"), n.get("client_id")))
            n = n.get("act")
    elif act is not None:
        raise CaseError("token.act: a list of actor subs or a nested {sub, act} object")
    scope = payload.get("scope")
    if isinstance(scope, list):
        scopes = frozenset(str(s) for s in scope)
        payload["scope"] = " ".join(scope)
    elif isinstance(scope, str):
        scopes = frozenset(scope.split())
    elif scope is None:
        scopes = frozenset()
    else:
        raise CaseError("token.scope: a space-separated string or a list")
    cnf = payload.get("cnf") or {}
    if not isinstance(cnf, Mapping):
        raise CaseError("token.cnf: a mapping like {jkt: ...} or {x5t#S256: ...}")
    details = payload.get("authorization_details") or []
    if not isinstance(details, list) or not all(isinstance(d, Mapping) for d in details):
        raise CaseError("token.authorization_details: a list of mappings")
    aud = payload.get("aud", "portcullis-policy-test")
    amr = payload.get("amr") or []
    claims = _freeze(payload)
    canonical = json.dumps(payload, sort_keys=True, default=str).encode()
    return TokenClaims(
        issuer=iss,
        subject=_opt_str(payload, "sub") or "",
        audience=tuple(aud) if isinstance(aud, list) else (str(aud),),
        expires_at=int(payload.get("exp", 2 ** 31 - 1)),
        fingerprint=hashlib.sha256(canonical).hexdigest(),
        client_id=_opt_str(payload, "client_id"),
        scopes=scopes,
        actors=tuple(actors),
        acr=_opt_str(payload, "acr"),
        amr=tuple(str(a) for a in amr),
        auth_time=_opt_int(payload, "auth_time"),
        issued_at=_opt_int(payload, "iat"),
        jti=_opt_str(payload, "jti"),
        cnf_jkt=_opt_str(cnf, "jkt"),
        cnf_x5t_s256=_opt_str(cnf, "x5t#S256"),
        authorization_details=claims.get("authorization_details", ()),
        claims=claims,
    )


def _opt_str(m: Mapping[str, Any], name: str) -> str | None:
    v = m.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise CaseError(f"token.{name} must be a string")
    return v


def _opt_int(m: Mapping[str, Any], name: str) -> int | None:
    v = m.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise CaseError(f"token.{name} must be an integer")
    return v


def _freeze(v: Any) -> Any:
    if isinstance(v, Mapping):
        return MappingProxyType({str(k): _freeze(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _query_text(q: Any) -> str:
    if q is None:
        return ""
    if isinstance(q, str):
        return q
    if isinstance(q, Mapping):
        parts = []
        for k, v in q.items():
            for item in (v if isinstance(v, list) else [v]):
                value = "true" if item is True else "false" if item is False else str(item)
                parts.append(f"{quote(str(k), safe='')}={quote(value, safe='')}")
        return "&".join(parts)
    raise CaseError("query: a string or a mapping")


def _body_bytes(body: Any) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body, default=str).encode("utf-8")


def simulate(policy: CompiledPolicy, request: Mapping[str, Any],
             now: float | None = None) -> Simulated:
    """Decide one request description (see the module docstring); raise CaseError when the
    description itself is unusable."""
    if not isinstance(request, Mapping):
        raise CaseError("request must be a mapping")
    unknown = sorted(str(k) for k in request if k not in _REQUEST_KEYS)
    if unknown:
        raise CaseError(f"request: unknown keys {', '.join(unknown)} (known: "
                        f"{', '.join(_REQUEST_KEYS)})")
    if request.get("now") is not None:
        now = request["now"]
    if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float))
                            or not math.isfinite(now)):
        raise CaseError("now: seconds since the epoch (a number)")
    now = None if now is None else float(now)
    workload = request.get("workload")
    if not isinstance(workload, str):
        raise CaseError("request.workload: the caller's SPIFFE ID is required")
    try:
        sid = parse_spiffe_id(workload)
    except InvalidValue as exc:
        raise CaseError(f"request.workload: {exc}") from None
    method = request.get("method", "GET")
    path = request.get("path")
    if not isinstance(method, str) or not isinstance(path, str):
        raise CaseError("request.method and request.path must be strings (path is required)")
    query = _query_text(request.get("query"))
    if query:
        if "?" in path:
            raise CaseError("request: give the query in path or in query, not both")
        path = f"{path}?{query}"
    token_spec = request.get("token")
    token = None if token_spec is None else build_token(token_spec)
    body = _body_bytes(request.get("body"))
    content_type = request.get("content_type")
    if content_type is None and body is not None:
        content_type = "application/json"

    try:
        target = canonicalize_target(path)
    except ProxyError as err:
        return Simulated("deny", err.code, None, now=now, stage="target")
    requirement = policy.authentication_for(method, target.path)
    binding = Binding("none")
    if token is None and requirement.token == "required":
        return Simulated("deny", "token_missing", None, now=now, stage="authentication")
    if token is not None:
        if requirement.token == "forbidden":
            return Simulated("deny", "token_forbidden", None, now=now, stage="authentication")
        kind = "dpop" if token.cnf_jkt else "mtls" if token.cnf_x5t_s256 else "bearer"
        need = requirement.binding
        if (need == "dpop" and kind != "dpop") or (need == "mtls" and kind != "mtls") or \
                (need == "any" and kind == "bearer"):
            return Simulated("deny", "binding_required", None, now=now, stage="authentication")
        binding = Binding(kind)  # type: ignore[arg-type]
    spec = policy.action_for(method, target.path)
    action, params = None, MappingProxyType({})
    if spec is not None:
        try:
            params = extract_params(spec, spec.captures(target.path), target.query,
                                    body if spec.needs_body else None,
                                    content_type=content_type)
        except ProxyError as err:
            return Simulated("deny", err.code, None, now=now, stage="action")
        action = spec.name
    ctx = RequestContext(sid, str(sid), method, target.path, target.query, token, binding,
                         action, params)
    verdict = evaluate(policy, ctx, now=now)
    out = verdict.outcome
    return Simulated(out.effect, out.code, out.rule_id, ctx, verdict, now)


# ------------------------------------------------------------------------------------------------
# Test cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    ok: bool
    message: str
    got: Simulated | None = None


def load_cases(path: Path) -> Any:
    try:  # bounded like every YAML document the project reads
        return yaml_document(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read test cases: {exc}", source=str(path)) from None


def run_file(policy: CompiledPolicy, doc: Any, file: str,
             default_now: float | None) -> list[CaseResult]:
    """Run every case of one test document:

        now: 1800000000          # optional clock for its cases
        defaults: {<request>}    # optional, deep-merged under each case's request
        cases:
          - name: ...            # required, unique in the file
            request: {<request>}
            expect: {decision: allow | deny | step_up, rule: <id> | null, code: <code>}

    `rule` and `code` are checked when given (`rule: null`: no rule decided)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("cases"), list) \
            or not doc["cases"]:
        return [CaseResult(file, "<file>", False, "a test file is a mapping with a non-empty "
                                                  "`cases` list")]
    unknown = sorted(str(k) for k in doc if k not in ("now", "defaults", "cases"))
    if unknown:
        return [CaseResult(file, "<file>", False, f"unknown keys {', '.join(unknown)} (known: "
                                                  "now, defaults, cases)")]
    now = doc.get("now", default_now)
    defaults = doc.get("defaults") or {}
    out = []
    seen: set[str] = set()
    for k, case in enumerate(doc["cases"]):
        name = case.get("name") if isinstance(case, Mapping) else None
        label = name if isinstance(name, str) and name else f"cases[{k}]"
        try:
            if not isinstance(case, Mapping):
                raise CaseError("a case is a mapping {name, request, expect}")
            extra = sorted(str(x) for x in case if x not in ("name", "request", "expect"))
            if extra:
                raise CaseError(f"unknown keys {', '.join(extra)} (known: name, request, expect)")
            if not isinstance(name, str) or not name:
                raise CaseError("name is required")
            if name in seen:
                raise CaseError("duplicate case name")
            seen.add(name)
            expect = _expectation(case.get("expect"))
            got = simulate(policy, merge(defaults, case.get("request") or {}), now)
        except CaseError as exc:
            out.append(CaseResult(file, label, False, f"bad case: {exc}"))
            continue
        problems = []
        if got.decision != expect["decision"]:
            problems.append(f"decision {got.decision}, expected {expect['decision']}")
        if "rule" in expect and got.rule != expect["rule"]:
            problems.append(f"rule {got.rule or 'null'}, expected {expect['rule'] or 'null'}")
        if "code" in expect and got.code != expect["code"]:
            problems.append(f"code {got.code}, expected {expect['code']}")
        summary = f"{got.decision} ({got.code}) rule {got.rule or 'null'}"
        out.append(CaseResult(file, label, not problems,
                              "; ".join(problems) + f" [got {summary}]" if problems else summary,
                              got))
    return out


def _expectation(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise CaseError("expect is required: {decision, rule, code}")
    extra = sorted(str(x) for x in raw if x not in _EXPECT_KEYS)
    if extra:
        raise CaseError(f"expect: unknown keys {', '.join(extra)}")
    if raw.get("decision") not in _DECISIONS:
        raise CaseError(f"expect.decision must be one of {', '.join(_DECISIONS)}")
    if "rule" in raw and raw["rule"] is not None and not isinstance(raw["rule"], str):
        raise CaseError("expect.rule: a rule id or null")
    if "code" in raw and not isinstance(raw["code"], str):
        raise CaseError("expect.code: a string")
    return dict(raw)
