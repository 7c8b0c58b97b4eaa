"""Policy evaluator: `evaluate(policy, ctx) -> Verdict`. Pure, default deny, never raises.

Semantics (the reference is `evaluate_linear`, which tests compare `evaluate` against):
- A rule matches when the request method is in one of its routes' `methods` (or the route has
  none), the canonical path matches one of that route's templates, and the workload SPIFFE ID
  matches one of its `from.workloads` patterns (trust domain equal; path segments as in templates).
- Enforced outcome, from non-shadow rules only: any matching deny ->
  Outcome("deny", "denied_by_rule", <first matching deny id in file order>); else any matching
  allow -> Outcome("allow", "allowed", <first matching allow id>); else
  Outcome("deny", "no_matching_rule", None). There is no default allow.
- Shadow: the outcome is computed again as if shadow rules were enforced; when it differs from the
  enforced one (effect or rule id) it is returned as `Verdict.shadow`, else `shadow` is None.
- `ctx.path` is expected to be canonical (`core.paths.canonicalize_target`); a path that does not
  start with "/" matches nothing. `ctx.workload_uri` is not consulted: matching reads the parsed
  `ctx.workload`, so the two can never disagree inside a decision.

How it is fast (the policy's `PolicyIndex`, built once by the compiler):
1. Workload: one dict lookup for rules naming the exact SPIFFE ID, plus a segment-trie walk over
   the trust domain's wildcard patterns (only if that trust domain has any) -> set W of rule
   indices.
   An empty W is an immediate default deny.
2. Path: a segment-trie walk over every route template; each terminal holds, per method, the
   frozenset of rule indices (rules without a method list already merged in) -> one dict.get.
3. Matching rules = W & terminal set (C set intersection, iterating the smaller side); the winner
   is the lowest index per kind. Verdicts without a shadow difference are precomputed, so the common
   path allocates only the trie walk's small lists.
The cost depends on the trie depth and on how many rules actually match, not on the rule count.
Later condition kinds (subjects, actors, actions, CEL `when`) are residual checks applied to the
few matching indices after step 3.
"""

from __future__ import annotations

from typing import Any

from proxy.core.model import Outcome, RequestContext, Verdict
from proxy.core.policy.compiler import KIND_DENY, KIND_SHADOW
from proxy.core.policy.model import CompiledPolicy, TrieNode

NO_MATCH = Outcome("deny", "no_matching_rule", None)
_DEFAULT_DENY = Verdict(NO_MATCH)
_EMPTY: frozenset[int] = frozenset()
_NONE = 1 << 62  # "no index": larger than any rule index


def _walk(root: TrieNode, segs: list[str], start: int) -> list[Any]:
    """Payloads of every template matching segs[start:] (`**` payloads and exact ends)."""
    out: list[Any] = []
    n = len(segs)
    stack = [(root, start)]
    pop = stack.pop
    push = stack.append
    while stack:
        node, i = pop()
        if node.rest is not None:
            out.append(node.rest)
        if i == n:
            if node.end is not None:
                out.append(node.end)
            continue
        seg = segs[i]
        child = node.lit.get(seg)
        if child is not None:
            push((child, i + 1))
        if node.one is not None and seg:
            push((node.one, i + 1))
    return out


def evaluate(policy: CompiledPolicy, ctx: RequestContext) -> Verdict:
    """Decide `ctx` against `policy` (see the module docstring). Never raises for a RequestContext
    of str fields and a SpiffeId workload; default deny."""
    idx = policy.index
    if idx is None:
        return _DEFAULT_DENY
    wid = ctx.workload
    wpath = wid.path
    if wpath and wpath[0] != "/":
        return _DEFAULT_DENY  # not a SPIFFE ID path: matches nothing
    w = idx.exact_workloads.get(wid, _EMPTY)
    trie = idx.workload_tries.get(wid.trust_domain)
    if trie is not None:
        found = _walk(trie, wpath.split("/"), 1)
        if found:
            w = w.union(*found)
    if not w:
        return _DEFAULT_DENY
    path = ctx.path
    if path[:1] != "/":
        return _DEFAULT_DENY
    method = ctx.method
    kinds = idx.kinds
    enf_deny = enf_allow = all_deny = all_allow = _NONE
    for ms in _walk(idx.path_root, path.split("/"), 1):
        cand = ms.by_method.get(method, ms.any)
        if not cand:
            continue
        for i in w & cand:
            k = kinds[i]
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
    if enf_deny != _NONE:
        enforced_idx, enforced_deny = enf_deny, True
    elif enf_allow != _NONE:
        enforced_idx, enforced_deny = enf_allow, False
    else:
        enforced_idx, enforced_deny = _NONE, True
    if idx.has_shadow:
        if all_deny != _NONE:
            shadow_idx, shadow_deny = all_deny, True
        elif all_allow != _NONE:
            shadow_idx, shadow_deny = all_allow, False
        else:
            shadow_idx, shadow_deny = _NONE, True
        if shadow_idx != enforced_idx or shadow_deny != enforced_deny:
            return Verdict(_outcome(idx, enforced_idx, enforced_deny),
                           _outcome(idx, shadow_idx, shadow_deny))
    if enforced_idx == _NONE:
        return _DEFAULT_DENY
    return (idx.verdicts_deny if enforced_deny else idx.verdicts_allow)[enforced_idx]


def _outcome(idx: Any, i: int, deny: bool) -> Outcome:
    if i == _NONE:
        return NO_MATCH
    return (idx.deny_outcomes if deny else idx.allow_outcomes)[i]


def decide_linear(rules: Any, ctx: RequestContext) -> Outcome:
    """Reference outcome of `rules` (all treated as enforced): first matching deny, else first
    matching allow, else no_matching_rule."""
    first_allow = None
    for r in rules:
        if r.matches(ctx):
            if r.effect == "deny":
                return Outcome("deny", "denied_by_rule", r.id)
            if first_allow is None:
                first_allow = r.id
    if first_allow is not None:
        return Outcome("allow", "allowed", first_allow)
    return NO_MATCH


def evaluate_linear(policy: CompiledPolicy, ctx: RequestContext) -> Verdict:
    """The reference semantics, rule by rule without the index: slow, obviously correct, and
    used by the tests and the benchmark to check `evaluate`."""
    enforced = decide_linear([r for r in policy.rules if not r.shadow], ctx)
    if not any(r.shadow for r in policy.rules):
        return Verdict(enforced)
    would_be = decide_linear(policy.rules, ctx)
    return Verdict(enforced, None if would_be == enforced else would_be)
