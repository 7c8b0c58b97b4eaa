"""Policy evaluator: `evaluate(policy, ctx, *, now=None) -> Verdict`. Pure, default deny, never
raises.

Semantics (the reference is `evaluate_linear`, which tests compare `evaluate` against):
- A rule's route and workload match when the request method is in one of its routes' `methods`
  (or the route has none), the canonical path matches one of that route's templates, and the
  workload SPIFFE ID matches one of its `from.workloads` patterns (trust domain equal; path
  segments as in templates) — or the rule has no `from.workloads`.
- A rule's `to` also matches when `ctx.action` (set by the pipeline from
  `CompiledPolicy.action_for`) is one of the actions it names.
- Its token selectors (`from.subjects`, `actors`, `clients`, `scopes`, `acr`, `amr`, `claims`)
  and requirements (`require`) need a verified token (`ctx.token`): without one the rule does not
  match. Each rule then decides NO, MATCH, or (allow rules with `require.acr_values` /
  `max_auth_age_s`) STEP_UP: everything else matched, but the token's `acr` is not one of
  `acr_values`, or its `auth_time` is missing or older than `now - max_auth_age_s`. A rule with
  `max_auth_age_s` evaluated without `now` is NO (fail closed). Failures of `peer_is`,
  `max_delegation_depth` and `authorization_details` are NO (see `model.Requirements`).
- Then its `when` condition (CEL, `conditions`): true keeps the result, false is NO, an
  evaluation error is NO for an allow rule and MATCH for a deny rule (fail closed both ways).
- Enforced outcome, from non-shadow rules only: any matching deny ->
  Outcome("deny", "denied_by_rule", <first matching deny id in file order>); else any matching
  allow -> Outcome("allow", "allowed", <first matching allow id>); else any allow rule at STEP_UP
  -> Outcome("step_up", "step_up_required", <first such id>, acr_values=<its acr_values>,
  max_age_s=<its max_auth_age_s>); else Outcome("deny", "no_matching_rule", None). There is no
  default allow, and a step-up never overrides a deny or an allow.
- Shadow: the outcome is computed again as if shadow rules were enforced; when it differs from the
  enforced one (effect or rule id) it is returned as `Verdict.shadow`, else `shadow` is None.
- `ctx.path` is expected to be canonical (`core.paths.canonicalize_target`); a path that does not
  start with "/" matches nothing. Workload patterns read the parsed `ctx.workload`; `peer_is`
  compares `ctx.workload_uri` and also requires it to equal `str(ctx.workload)`, so the two can
  never disagree inside a decision.

How it is fast (the policy's `PolicyIndex`, built once by the compiler):
1. Workload: one dict lookup for rules naming the exact SPIFFE ID, plus a segment-trie walk over
   the trust domain's wildcard patterns (only if that trust domain has any) -> set W of rule
   indices; rules without workload patterns are the set A.
   An empty W and A is an immediate default deny.
2. Path: a segment-trie walk over every route template; each terminal holds, per method, the
   frozenset of rule indices (rules without a method list already merged in) -> one dict.get.
3. Matching rules = (W | A) & terminal set (C set intersections, iterating the smaller side); the
   winner is the lowest index per kind. Rules with token conditions or requirements run their
   residual check (`CompiledRule.residual`) on these few candidates only. Verdicts without a
   shadow difference are precomputed, so the common path allocates only the trie walk's small
   lists.
   A request that is a policy action (`ctx.action`) also takes the rules naming that action in
   `to`: one more candidate set (`PolicyIndex.action_sets`), one dict lookup.
4. CEL `when` conditions are part of the residual check (`CompiledRule.residual_when`), so a
   compiled program runs only for rules the index already selected and whose token selectors
   and requirements held; its result is memoised per evaluation. A condition that is false is
   NO; one that errors is NO for an allow rule and MATCH for a deny rule (fail closed).
The cost depends on the trie depth and on how many rules actually match, not on the rule count.
`explain.explain` re-checks the rules part by part for a trace; this path is not involved.
"""

from __future__ import annotations

from typing import Any

from proxy.core.model import Outcome, RequestContext, Verdict
from proxy.core.policy.compiler import KIND_DENY, KIND_RESIDUAL, KIND_SHADOW
from proxy.core.policy.model import MATCH, NO, STEP_UP, CompiledPolicy, walk

NO_MATCH = Outcome("deny", "no_matching_rule", None)
_DEFAULT_DENY = Verdict(NO_MATCH)
_EMPTY: frozenset[int] = frozenset()
_NONE = 1 << 62  # "no index": larger than any rule index

_walk = walk  # kept for callers of the old private name


def evaluate(policy: CompiledPolicy, ctx: RequestContext, *,
             now: float | None = None) -> Verdict:
    """Decide `ctx` against `policy` (see the module docstring). `now` (seconds since the epoch)
    is needed only by rules with `require.max_auth_age_s`. Never raises for a RequestContext of
    str fields, a SpiffeId workload and a TokenClaims (or None) token; default deny."""
    idx = policy.index
    if idx is None:
        return _DEFAULT_DENY
    wid = ctx.workload
    anyw = idx.any_workload
    memo_w = idx.workload_memo
    w = memo_w.get(wid)
    if w is None:
        w = _workload_rules(idx, wid)
        if len(memo_w) >= _WORKLOAD_MEMO_MAX:
            memo_w.clear()
        memo_w[wid] = w
    if not w and not anyw:
        return _DEFAULT_DENY
    path = ctx.path
    method = ctx.method
    kinds = idx.kinds
    enf_deny = enf_allow = enf_step = all_deny = all_allow = all_step = _NONE
    memo = None
    # a path that does not start with "/" matches no template (an action still counts)
    terminals = walk(idx.path_root, path.split("/"), 1) if path[:1] == "/" else []
    action = ctx.action
    if action is not None:
        ams = idx.action_sets.get(action)
        if ams is not None:
            terminals.append(ams)  # the rules naming this action, like one more terminal
    for ms in terminals:
        cand = ms.by_method.get(method, ms.any)
        if not cand:
            continue
        hits = w & cand
        if anyw:
            hits |= anyw & cand
        for i in hits:
            k = kinds[i]
            if k & KIND_RESIDUAL:
                if memo is None:
                    memo = {}
                r = idx.residuals[i](ctx, now, memo)
                if r == NO:
                    continue
                if r == STEP_UP:  # allow rules only
                    if i < all_step:
                        all_step = i
                    if not k & KIND_SHADOW and i < enf_step:
                        enf_step = i
                    continue
            if k & KIND_DENY:
                if i < all_deny:
                    all_deny = i
                if not k & KIND_SHADOW and i < enf_deny:
                    enf_deny = i
            else:
                if i < all_allow:
                    all_allow = i
                if not k & KIND_SHADOW and i < enf_allow:
                    enf_allow = i
    enforced = _pick(enf_deny, enf_allow, enf_step)
    if idx.has_shadow:
        shadow = _pick(all_deny, all_allow, all_step)
        if shadow != enforced:
            return Verdict(_outcome(idx, *enforced), _outcome(idx, *shadow))
    i, kind = enforced
    if kind == _KIND_NONE:
        return _DEFAULT_DENY
    if kind == _KIND_DENY:
        return idx.verdicts_deny[i]
    if kind == _KIND_ALLOW:
        return idx.verdicts_allow[i]
    return idx.verdicts_step[i]


_KIND_NONE, _KIND_DENY, _KIND_ALLOW, _KIND_STEP = 0, 1, 2, 3
_WORKLOAD_MEMO_MAX = 4096


def _workload_rules(idx: Any, wid: Any) -> frozenset[int]:
    """Indices of the rules whose `from.workloads` select this SPIFFE ID (exact and patterns)."""
    wpath = wid.path
    if wpath and wpath[0] != "/":
        return _EMPTY  # not a SPIFFE ID path: no workload pattern matches it
    w = idx.exact_workloads.get(wid, _EMPTY)
    trie = idx.workload_tries.get(wid.trust_domain)
    if trie is not None:
        found = walk(trie, wpath.split("/"), 1)
        if found:
            w = w.union(*found)
    return w


def _pick(deny: int, allow: int, step: int) -> tuple[int, int]:
    if deny != _NONE:
        return deny, _KIND_DENY
    if allow != _NONE:
        return allow, _KIND_ALLOW
    if step != _NONE:
        return step, _KIND_STEP
    return _NONE, _KIND_NONE


def _outcome(idx: Any, i: int, kind: int) -> Outcome:
    if kind == _KIND_NONE:
        return NO_MATCH
    if kind == _KIND_DENY:
        return idx.deny_outcomes[i]
    if kind == _KIND_ALLOW:
        return idx.allow_outcomes[i]
    return idx.step_outcomes[i]


def decide_linear(rules: Any, ctx: RequestContext, now: float | None = None) -> Outcome:
    """Reference outcome of `rules` (all treated as enforced): first matching deny, else first
    matching allow, else first allow rule at step-up, else no_matching_rule."""
    first_allow = first_step = None
    for r in rules:
        d = r.decide(ctx, now)
        if d == NO:
            continue
        if r.effect == "deny":
            if d == MATCH:
                return Outcome("deny", "denied_by_rule", r.id)
        elif d == MATCH:
            if first_allow is None:
                first_allow = r.id
        elif first_step is None:
            first_step = r
    if first_allow is not None:
        return Outcome("allow", "allowed", first_allow)
    if first_step is not None:
        req = first_step.require
        return Outcome("step_up", "step_up_required", first_step.id, req.acr_values,
                       req.max_auth_age_s)
    return NO_MATCH


def evaluate_linear(policy: CompiledPolicy, ctx: RequestContext, *,
                    now: float | None = None) -> Verdict:
    """The reference semantics, rule by rule without the index: slow, obviously correct, and
    used by the tests and the benchmark to check `evaluate`."""
    enforced = decide_linear([r for r in policy.rules if not r.shadow], ctx, now)
    if not any(r.shadow for r in policy.rules):
        return Verdict(enforced)
    would_be = decide_linear(policy.rules, ctx, now)
    return Verdict(enforced, None if would_be == enforced else would_be)


def candidates(policy: CompiledPolicy, ctx: RequestContext) -> frozenset[int]:
    """The indices of the rules the index selects for `ctx` (route or action, and workload)
    before any residual check: what `evaluate` looks at. For `explain`, not the hot path."""
    idx = policy.index
    if idx is None:
        return _EMPTY
    w = _workload_rules(idx, ctx.workload) | idx.any_workload
    terminals = walk(idx.path_root, ctx.path.split("/"), 1) if ctx.path[:1] == "/" else []
    if ctx.action is not None and ctx.action in idx.action_sets:
        terminals.append(idx.action_sets[ctx.action])
    out: set[int] = set()
    for ms in terminals:
        out |= w & ms.by_method.get(ctx.method, ms.any)
    return frozenset(out)
