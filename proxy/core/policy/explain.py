"""`explain(policy, ctx, *, now=None) -> Explanation`: why the policy decides what it decides.

Not on the request path: it re-checks every rule part by part with the reference matchers
(`CompiledRule.decide` and the pieces it is made of), reusing the compiled rules, and reports the
index's candidates (the rules `evaluate` looked at) next to it. `evaluate` itself is unchanged, so
explaining costs the normal path nothing. The verdict in the explanation is `evaluate`'s.

For each rule (file order): whether the index selected it, and each check with its outcome:
  to        a route (method + template) or the request's action matched, or none did
  workload  a `from.workloads` pattern matched the mTLS peer (or the rule has none)
  token     the token selectors (`from.subjects`, `actors`, ...), each failing one named
  require   each requirement (`peer_is`, `max_delegation_depth`, `authorization_details`,
            `acr_values` / `max_auth_age_s`: these two give step-up rather than no)
  when      the CEL condition: true, false, or the evaluation error (and what that means for
            the rule's effect: an allow rule does not match, a deny rule matches)
and the rule's result: match, step_up or no.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.core.model import RequestContext, Verdict
from proxy.core.policy.evaluator import candidates, evaluate
from proxy.core.policy.model import (
    MATCH,
    NO,
    STEP_UP,
    CompiledPolicy,
    CompiledRule,
    Requirements,
    TokenMatch,
)

_RESULT = {NO: "no", STEP_UP: "step_up", MATCH: "match"}


@dataclass(frozen=True, slots=True)
class Check:
    """One part of a rule: `ok` True / False, or None when the rule has no such part (or it was
    not reached: the `require` of a request without a token)."""

    name: str
    ok: bool | None
    detail: str


@dataclass(frozen=True, slots=True)
class RuleTrace:
    index: int
    id: str
    effect: str
    shadow: bool
    candidate: bool
    result: str  # match | step_up | no
    checks: tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    verdict: Verdict
    candidates: tuple[int, ...]
    rules: tuple[RuleTrace, ...]


def explain(policy: CompiledPolicy, ctx: RequestContext, *, now: float | None = None
            ) -> Explanation:
    cands = candidates(policy, ctx)
    memo: dict[str, Any] = {}
    traces = tuple(_trace(r, ctx, now, r.index in cands, memo) for r in policy.rules)
    return Explanation(evaluate(policy, ctx, now=now), tuple(sorted(cands)), traces)


def _trace(rule: CompiledRule, ctx: RequestContext, now: float | None, candidate: bool,
           memo: dict[str, Any]) -> RuleTrace:
    checks = [_to(rule, ctx), _workload(rule, ctx)]
    if rule.token is not None:
        checks.append(_token(rule.token, ctx))
    if rule.require is not None:
        checks.append(_require(rule.require, ctx, now))
    if rule.when is not None:
        checks.append(_when(rule, ctx, now, memo))
    return RuleTrace(rule.index, rule.id, rule.effect, rule.shadow, candidate,
                     _RESULT[rule.decide(ctx, now)], tuple(checks))


def _to(rule: CompiledRule, ctx: RequestContext) -> Check:
    if ctx.action is not None and ctx.action in rule.actions:
        return Check("to", True, f"action {ctx.action}")
    for r in rule.routes:
        for t in r.paths:
            if (r.methods is None or ctx.method in r.methods) and t.matches(ctx.path):
                methods = "any method" if r.methods is None else ",".join(sorted(r.methods))
                return Check("to", True, f"{methods} {t.source}")
    parts = [f"{'any' if r.methods is None else ','.join(sorted(r.methods))} "
             f"{' '.join(t.source for t in r.paths)}" for r in rule.routes]
    parts += [f"action {a}" for a in sorted(rule.actions)]
    return Check("to", False, f"{ctx.method} {ctx.path} is none of: {'; '.join(parts)}")


def _workload(rule: CompiledRule, ctx: RequestContext) -> Check:
    if not rule.workloads:
        return Check("workload", None, "any workload")
    for w in rule.workloads:
        if w.matches(ctx.workload):
            return Check("workload", True, w.source)
    return Check("workload", False, f"{ctx.workload} is none of "
                                    f"{', '.join(w.source for w in rule.workloads)}")


def _token_parts(tm: TokenMatch) -> list[tuple[str, TokenMatch]]:
    parts = []
    if tm.subjects is not None:
        parts.append(("subjects", TokenMatch(subjects=tm.subjects)))
    if tm.actors:
        parts.append((f"actors ({tm.actor_position})",
                      TokenMatch(actors=tm.actors, actor_position=tm.actor_position)))
    if tm.clients is not None:
        parts.append(("clients", TokenMatch(clients=tm.clients)))
    if tm.scopes:
        parts.append(("scopes", TokenMatch(scopes=tm.scopes)))
    if tm.acr is not None:
        parts.append(("acr", TokenMatch(acr=tm.acr)))
    if tm.amr:
        parts.append(("amr", TokenMatch(amr=tm.amr)))
    for name, values in tm.claims:
        parts.append((f"claims.{name}", TokenMatch(claims=((name, values),))))
    return parts


def _token(tm: TokenMatch, ctx: RequestContext) -> Check:
    tok = ctx.token
    if tok is None:
        return Check("token", False, "no token (the rule has token selectors)")
    parts = _token_parts(tm)
    failed = [label for label, part in parts if not part.matches(tok)]
    if failed:
        return Check("token", False, f"fails {', '.join(failed)}")
    return Check("token", True, ", ".join(label for label, _ in parts))


def _require(req: Requirements, ctx: RequestContext, now: float | None) -> Check:
    tok = ctx.token
    if tok is None:
        return Check("require", False, "no token (requirements need one)")
    parts: list[tuple[str, Requirements]] = []
    if req.peer_is is not None:
        parts.append((f"peer_is {req.peer_is}", Requirements(peer_is=req.peer_is)))
    if req.max_delegation_depth is not None:
        parts.append((f"max_delegation_depth {req.max_delegation_depth}",
                      Requirements(max_delegation_depth=req.max_delegation_depth)))
    if req.authorization_details is not None:
        parts.append((f"authorization_details {req.authorization_details.type}",
                      Requirements(authorization_details=req.authorization_details)))
    if req.acr_values:
        parts.append((f"acr_values {' '.join(req.acr_values)}",
                      Requirements(acr_values=req.acr_values)))
    if req.max_auth_age_s is not None:
        parts.append((f"max_auth_age_s {req.max_auth_age_s}",
                      Requirements(max_auth_age_s=req.max_auth_age_s)))
    results = [(label, part.check(ctx, tok, now)) for label, part in parts]
    failed = [label for label, r in results if r == NO]
    step = [label for label, r in results if r == STEP_UP]
    if failed:
        return Check("require", False, "fails " + ", ".join(failed))
    if step:
        return Check("require", False, "step-up: " + ", ".join(step))
    return Check("require", True, ", ".join(label for label, _ in results))


def _when(rule: CompiledRule, ctx: RequestContext, now: float | None,
          memo: dict[str, Any]) -> Check:
    w = rule.when
    got = w.result(ctx, now, memo)
    if got is True:
        return Check("when", True, f"true: {w.source}")
    if got is False:
        return Check("when", False, f"false: {w.source}")
    consequence = "the deny rule matches (fail closed)" if rule.effect == "deny" \
        else "the allow rule does not match (fail closed)"
    return Check("when", rule.effect == "deny", f"error: {got}; {consequence}: {w.source}")
