"""Compiled policy values: what `compiler.compile_policy` builds and `evaluator.evaluate` reads.

Rules:
- Everything public is frozen; a `CompiledPolicy` is one immutable snapshot of one revision, shared
  by every request that took it (DESIGN section 3, "state is an immutable snapshot").
- Each compiled part keeps its `source` text so audit records and `config check` can quote it.
- Each matcher has a plain `matches()` method: the reference semantics, used by
  `evaluator.evaluate_linear` and by the tests to cross-check the indexed evaluator.
- The index (`PolicyIndex`) is built once by the compiler and never mutated afterwards; its dicts
  are plain dicts only because lookups on them are the hot path.

Rule results (`CompiledRule.decide`): `NO` (does not match), `STEP_UP` (an allow rule matched
everything but the strength or freshness of the user's authentication, RFC 9470), `MATCH`.

Segment wildcards (shared by workload patterns, actor patterns and path templates):
- `*` matches exactly one non-empty segment; `{name}` (path templates only) does the same and
  names it;
- `**` matches zero or more segments and may only be the last segment.
"""

from __future__ import annotations

import operator
from collections import abc
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal, Mapping

from proxy.core.model import Effect, Outcome, RequestContext, SpiffeId, TokenClaims
from proxy.core.policy.params import (
    AMBIGUOUS,
    Number,
    decode_capture,
    field_decimal,
    field_text,
    param_decimal,
    parse_query,
    query_param,
    same_name,
)
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import InvalidValue

ONE = "*"
REST = "**"

#: `CompiledRule.decide` results (ordered: a larger value is a better match).
NO = 0
STEP_UP = 1
MATCH = 2

TokenMode = Literal["required", "optional", "forbidden"]
BindingMode = Literal["dpop", "mtls", "any", "none"]


def _is_one(seg: str) -> bool:
    return seg == ONE or seg[:1] == "{"


def match_segments(pattern: tuple[str, ...], segs: list[str] | tuple[str, ...],
                   start: int = 0) -> bool:
    """Reference matcher: does `pattern` match `segs[start:]`? (`*`/`{x}` = one non-empty segment,
    `**` = the rest, any other string = that literal segment.)"""
    n = len(segs) - start
    for k, p in enumerate(pattern):
        if p == REST:
            return True
        if k >= n:
            return False
        seg = segs[start + k]
        if _is_one(p):
            if not seg:
                return False
        elif p != seg:
            return False
    return len(pattern) == n


@dataclass(frozen=True, slots=True)
class WorkloadPattern:
    """A SPIFFE ID pattern: `trust_domain` must be equal; `segments` are matched against the ID's
    path segments (exact IDs have no wildcard segment)."""

    source: str
    trust_domain: str
    segments: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not any(s == ONE or s == REST for s in self.segments)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        path = spiffe_id.path
        if path and path[0] != "/":
            return False
        return match_segments(self.segments, path.split("/"), 1)


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A route path template, split into segments (`/a/{id}/**` -> ("a", "{id}", "**")).
    The root "/" is ("",) and a trailing slash is a final "" segment, as in request paths."""

    source: str
    segments: tuple[str, ...]
    params: tuple[str, ...] = ()

    def matches(self, path: str) -> bool:
        if path[:1] != "/":
            return False
        return match_segments(self.segments, path.split("/"), 1)


@dataclass(frozen=True, slots=True)
class Route:
    """`methods` is None when any method is allowed."""

    methods: frozenset[str] | None
    paths: tuple[PathTemplate, ...]

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return any(t.matches(path) for t in self.paths)


@dataclass(frozen=True, slots=True)
class ActorPattern:
    """A pattern for an actor's `sub`: a SPIFFE ID pattern (`spiffe` set) when the source starts
    with spiffe://, else the exact string. Exact SPIFFE IDs compare as strings (the pattern is
    canonical, so only the canonical spelling of the ID can be equal)."""

    source: str
    spiffe: WorkloadPattern | None = None

    def matches(self, sub: str) -> bool:
        pattern = self.spiffe
        if pattern is None or pattern.exact:
            return sub == self.source
        try:
            parsed = parse_spiffe_id(sub)
        except InvalidValue:
            return False
        return pattern.matches(parsed)


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """`from` selectors that read the verified access token (all must hold; each list is any-of
    except `scopes` and `amr`, which need every listed value). Without a token nothing matches.

    - `subjects`: issuer -> allowed subjects (None: any subject of that issuer);
    - `actors`: patterns for actors[0].sub (`actor_position` "current") or any actor ("any");
    - `clients`: exact `client_id`; `acr`: the token's `acr` is one of these;
    - `scopes` / `amr`: all present; `claims`: top-level string claim equals one of the values.
    """

    subjects: Mapping[str, frozenset[str] | None] | None = None
    actors: tuple[ActorPattern, ...] = ()
    actor_position: Literal["current", "any"] = "current"
    clients: frozenset[str] | None = None
    scopes: frozenset[str] = frozenset()
    acr: frozenset[str] | None = None
    amr: frozenset[str] = frozenset()
    claims: tuple[tuple[str, frozenset[str]], ...] = ()
    #: computed: actor patterns compared as strings, and those that need the SPIFFE matcher
    actor_exact: frozenset[str] = field(default=frozenset(), init=False)
    actor_wild: tuple[ActorPattern, ...] = field(default=(), init=False)
    #: computed: memo key (equal selectors share one `matches` result within an evaluation)
    key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", "t:" + repr((
            None if self.subjects is None else sorted(self.subjects.items(), key=lambda kv: kv[0]),
            self.actors, self.actor_position, self.clients, self.scopes, self.acr, self.amr,
            self.claims)))
        exact = [p.source for p in self.actors if p.spiffe is None or p.spiffe.exact]
        wild = [p for p in self.actors if p.spiffe is not None and not p.spiffe.exact]
        object.__setattr__(self, "actor_exact", frozenset(exact))
        object.__setattr__(self, "actor_wild", tuple(wild))

    def matches(self, tok: TokenClaims) -> bool:
        subjects = self.subjects
        if subjects is not None:
            subs = subjects.get(tok.issuer, _ABSENT)
            if subs is _ABSENT:
                return False
            if subs is not None and tok.subject not in subs:
                return False
        if self.clients is not None and tok.client_id not in self.clients:
            return False
        if self.scopes and not self.scopes <= tok.scopes:
            return False
        if self.acr is not None and tok.acr not in self.acr:
            return False
        if self.amr and not self.amr.issubset(tok.amr):
            return False
        if self.claims:
            claims = tok.claims
            for name, values in self.claims:
                value = claims.get(name)
                if type(value) is not str or value not in values:
                    return False
        if self.actors:
            actors = tok.actors
            if not actors:
                return False
            chain = actors[:1] if self.actor_position == "current" else actors
            exact, wild = self.actor_exact, self.actor_wild
            for a in chain:
                sub = a.sub
                if sub in exact:
                    return True
                for p in wild:
                    if p.matches(sub):
                        return True
            return False
        return True


_ABSENT = object()


_COMPARE = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt}


@dataclass(frozen=True, slots=True)
class Bound:
    """`<param> <op> <field or literal>`: the request parameter compared with the details entry's
    field (`field` set) or with a number literal (`literal` set)."""

    param: str
    op: Literal["le", "lt", "ge", "gt"]
    field: str | None = None
    literal: Number | None = None


@dataclass(frozen=True, slots=True)
class ParamSource:
    """Where a rule's request parameters come from when one of its templates matched: the route's
    `methods` (None: any), the template's `segments`, and its captures as (name, index into
    `path.split("/")`)."""

    methods: frozenset[str] | None
    segments: tuple[str, ...]
    captures: tuple[tuple[str, int], ...]

    @staticmethod
    def of(routes: tuple[Route, ...]) -> tuple[ParamSource, ...]:
        return tuple(
            ParamSource(r.methods, t.segments,
                        tuple((seg[1:-1], k + 1) for k, seg in enumerate(t.segments)
                              if seg[:1] == "{"))
            for r in routes for t in r.paths)


@dataclass(frozen=True, slots=True)
class DetailsRequirement:
    """`require.authorization_details` (RFC 9396): some entry of the token's
    `authorization_details` has this `type`, each `match` field equals its request parameter (as
    strings) and every bound holds numerically (see `params` for reading parameters/numbers).

    Parameters are read per matching template of the rule (`sources`, in rule order): the
    requirement holds when it holds for the parameters of any of them."""

    type: str
    match: tuple[tuple[str, str], ...] = ()  # (entry field, request parameter)
    bounds: tuple[Bound, ...] = ()
    sources: tuple[ParamSource, ...] = ()
    #: the rule's actions: when the request is one of them, its typed parameters
    #: (`RequestContext.params`) are read too (see `action_values`)
    actions: frozenset[str] = frozenset()
    #: computed: every request parameter read, once each, in order of first use, with its
    #: `params.same_name` key; the literal bounds and the field bounds, as (param, compare, x)
    params: tuple[tuple[str, str], ...] = field(default=(), init=False)
    literal_bounds: tuple[tuple[str, Any, Number], ...] = field(default=(), init=False)
    field_bounds: tuple[tuple[str, Any, str], ...] = field(default=(), init=False)
    #: computed: memo key of `read` (equal for requirements that read the same way)
    read_key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        names = dict.fromkeys([p for _, p in self.match] + [b.param for b in self.bounds])
        object.__setattr__(self, "params", tuple((n, same_name(n)) for n in names))
        object.__setattr__(self, "read_key", "r:" + repr((self.sources, self.params,
                                                          sorted(self.actions))))
        object.__setattr__(self, "literal_bounds", tuple(
            (b.param, _COMPARE[b.op], b.literal) for b in self.bounds if b.field is None))
        object.__setattr__(self, "field_bounds", tuple(
            (b.param, _COMPARE[b.op], b.field) for b in self.bounds if b.field is not None))

    def holds(self, ctx: RequestContext, details: tuple[Any, ...],
              memo: dict[str, Any] | None = None) -> bool:
        """Does the requirement hold for this request and these token details? `memo` (one per
        evaluation) shares parameter reads between rules that read the same parameters."""
        if not details:
            return False
        if memo is None:
            readings = self.read(ctx, None)
        else:
            readings = memo.get(self.read_key)
            if readings is None:
                readings = memo[self.read_key] = self.read(ctx, memo)
        for values in readings:
            if self.satisfied(details, values):
                return True
        return False

    def read(self, ctx: RequestContext, memo: dict[str, Any] | None) -> list[dict[str, str]]:
        """The parameter values of each matching template (of a route whose method matches), in
        rule order, then those of the request's action when it is one of the rule's; readings
        where some parameter is absent or ambiguous are left out."""
        method = ctx.method
        segs: list[str] | None = None
        query: Mapping[str, Any] | None = None
        out = []
        sources = self.sources
        actions = self.actions
        if actions and ctx.action in actions:
            values = action_values(self.params, ctx.params)
            if values is not None:
                out.append(values)
        # One template: the caller (index or `decide`) already matched the route, so it matched
        # (unless the rule also has actions: then it may have matched through one of them).
        single = len(sources) == 1 and not actions
        for src in sources:
            if src.methods is not None and method not in src.methods:
                continue
            if segs is None:
                if ctx.path[:1] != "/":
                    return out
                segs = ctx.path.split("/")
            if not single and not match_segments(src.segments, segs, 1):
                continue
            if query is None:
                if memo is None:
                    query = parse_query(ctx.query)
                else:
                    query = memo.get("q:")
                    if query is None:
                        query = memo["q:"] = parse_query(ctx.query)
            values = _read_params(self.params, src.captures, segs, query)
            if values is not None:
                out.append(values)
        return out

    def satisfied(self, details: tuple[Any, ...], values: Mapping[str, str]) -> bool:
        """Does some entry of `details` satisfy this requirement for these parameter values?"""
        numbers: dict[str, Number] = {}
        for b in self.bounds:
            if b.param not in numbers:
                n = param_decimal(values[b.param])
                if n is None:
                    return False
                numbers[b.param] = n
        for param, compare, literal in self.literal_bounds:  # the same for every entry
            if not compare(numbers[param], literal):
                return False
        dtype, match, field_bounds = self.type, self.match, self.field_bounds
        for entry in details:
            t = type(entry)
            if t is not MappingProxyType and t is not dict and not isinstance(entry, abc.Mapping):
                continue
            if entry.get("type") != dtype:
                continue
            for f, p in match:
                if field_text(entry.get(f)) != values[p]:
                    break
            else:
                for param, compare, fld in field_bounds:
                    other = field_decimal(entry.get(fld))
                    if other is None or not compare(numbers[param], other):
                        break
                else:
                    return True
        return False


def action_values(names: tuple[tuple[str, str], ...],
                  params: Mapping[str, Any]) -> dict[str, str] | None:
    """The typed action parameters as the strings `satisfied` compares (`match` as strings,
    `bounds` through `param_decimal`): str as is, int in decimal, Decimal in plain positional
    notation; None when one is absent or of another type (a bool, a JSON object...)."""
    out: dict[str, str] = {}
    try:
        for name, _key in names:
            v = params.get(name)
            t = type(v)
            if t is str:
                out[name] = v  # type: ignore[assignment]
            elif t is int:
                out[name] = str(v)
            elif t is Decimal and v.is_finite():  # type: ignore[union-attr]
                out[name] = format(v, "f")
            else:
                return None
    except Exception:  # noqa: BLE001 - a params mapping that misbehaves reads as absent
        return None
    return out


def _read_params(names: tuple[tuple[str, str], ...], captures: tuple[tuple[str, int], ...],
                 segs: list[str], query: Mapping[str, Any]) -> dict[str, str] | None:
    """name -> value for every (name, same_name key), or None when one is absent or ambiguous
    (given twice, in the path and the query, or the query is unreadable)."""
    out: dict[str, str] = {}
    for name, key in names:
        q = query_param(query, name, key)
        for cname, pos in captures:
            if cname == name:
                if q is not None:
                    return None  # given twice: ambiguous
                v = decode_capture(segs[pos])
                break
        else:
            v = None if q is AMBIGUOUS else q
        if v is None:
            return None
        out[name] = v
    return out


@dataclass(frozen=True, slots=True)
class Requirements:
    """`require` of an allow rule. `peer_is`, `max_delegation_depth` and `authorization_details`
    are hard conditions (a failure is a non-match); `acr_values` / `max_auth_age_s` turn a failure
    into `STEP_UP`. `max_auth_age_s` with `now` None is a non-match (fail closed)."""

    peer_is: Literal["actor", "client"] | None = None
    max_delegation_depth: int | None = None
    acr_values: tuple[str, ...] = ()
    max_auth_age_s: int | None = None
    authorization_details: DetailsRequirement | None = None

    def check(self, ctx: RequestContext, tok: TokenClaims, now: float | None,
              memo: dict[str, Any] | None = None) -> int:
        peer_is = self.peer_is
        if peer_is is not None:
            uri = ctx.workload_uri
            if peer_is == "actor":
                if not tok.actors or tok.actors[0].sub != uri:
                    return NO
            elif tok.client_id != uri:
                return NO
            if str(ctx.workload) != uri:  # the parsed ID and its text must agree
                return NO
        if self.max_delegation_depth is not None and len(tok.actors) > self.max_delegation_depth:
            return NO
        details = self.authorization_details
        if details is not None and not details.holds(ctx, tok.authorization_details, memo):
            return NO
        max_age = self.max_auth_age_s
        if max_age is not None and now is None:
            return NO
        if self.acr_values and tok.acr not in self.acr_values:
            return STEP_UP
        if max_age is not None:
            auth_time = tok.auth_time
            if auth_time is None or not auth_time >= now - max_age:  # type: ignore[operator]
                return STEP_UP
        return MATCH


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule; `index` is its position in the file (order decides between matching rules).
    `workloads` is () when the rule does not constrain the calling workload (then `token` is set);
    `token` holds the token selectors of `from`, `require` the requirements of an allow rule,
    `actions` the action names of `to` (a request matches the rule's `to` when one of `routes`
    matches it or its `RequestContext.action` is one of them), `when` its CEL condition."""

    id: str
    index: int
    effect: Effect
    shadow: bool
    description: str
    workloads: tuple[WorkloadPattern, ...]
    routes: tuple[Route, ...]
    token: TokenMatch | None = None
    require: Requirements | None = None
    step_up: Outcome | None = None  # the outcome when `decide` says STEP_UP
    actions: frozenset[str] = frozenset()
    when: Any = None  # conditions.When | None

    @property
    def needs_token(self) -> bool:
        return self.token is not None or self.require is not None

    @property
    def has_residual(self) -> bool:
        """Does the rule need its residual check (token conditions, requirements, `when`)?"""
        return self.token is not None or self.require is not None or self.when is not None

    def matches_to(self, ctx: RequestContext) -> bool:
        """Does `to` match: a route, or the request's action?"""
        if ctx.action is not None and ctx.action in self.actions:
            return True
        return any(r.matches(ctx.method, ctx.path) for r in self.routes)

    def decide(self, ctx: RequestContext, now: float | None = None) -> int:
        """Reference semantics of a rule: NO, STEP_UP or MATCH."""
        if not self.matches_to(ctx):
            return NO
        if self.workloads and not any(w.matches(ctx.workload) for w in self.workloads):
            return NO
        return self.decide_residual(ctx, now)

    def residual(self, ctx: RequestContext, now: float | None = None,
                 memo: dict[str, Any] | None = None) -> int:
        """The token conditions and requirements, for a request whose route and workload already
        matched (the indexed evaluator calls this for the few rules its index found). `memo`, one
        fresh dict per evaluation, shares work between rules with equal selectors."""
        tm = self.token
        if tm is None and self.require is None:
            return MATCH
        tok = ctx.token
        if tok is None:
            return NO
        if tm is not None:
            if memo is None:
                ok = tm.matches(tok)
            else:
                ok = memo.get(tm.key)
                if ok is None:
                    ok = memo[tm.key] = tm.matches(tok)
            if not ok:
                return NO
        if self.require is None:
            return MATCH
        return self.require.check(ctx, tok, now, memo)

    def residual_when(self, ctx: RequestContext, now: float | None = None,
                      memo: dict[str, Any] | None = None) -> int:
        """`residual`, then the `when` condition (rules that have one): false is NO; an
        evaluation error is NO for an allow rule and MATCH for a deny rule (fail closed)."""
        r = self.residual(ctx, now, memo)
        if r == NO:
            return NO
        ok = self.when.result(ctx, now, memo)
        if ok is True:
            return r
        if ok is False:
            return NO
        return MATCH if self.effect == "deny" else NO

    def decide_residual(self, ctx: RequestContext, now: float | None = None,
                        memo: dict[str, Any] | None = None) -> int:
        return self.residual(ctx, now, memo) if self.when is None \
            else self.residual_when(ctx, now, memo)

    def matches(self, ctx: RequestContext, now: float | None = None) -> bool:
        """True when the rule fully matches (not merely up to a step-up)."""
        return self.decide(ctx, now) == MATCH


@dataclass(frozen=True, slots=True)
class AuthRequirement:
    """What a route needs before any rule runs (`authentication` section): `token` required |
    optional | forbidden; `binding` dpop | mtls | any (DPoP or mTLS, a bearer token is refused) |
    none (an unbound bearer token is accepted). `entry` is the deciding entry's index, None for
    the default (no entry matched)."""

    token: TokenMode
    binding: BindingMode
    entry: int | None = None


DEFAULT_AUTH = AuthRequirement("optional", "any", None)


@dataclass(frozen=True, slots=True)
class AuthEntry:
    """One `authentication` entry: first match in file order wins."""

    index: int
    route: Route
    requirement: AuthRequirement


class TrieNode:
    """A segment trie node (internal to the index). `lit` maps literal segments to children, `one`
    is the child for a one-segment wildcard, `rest` is the payload of templates that end in `**`
    here, and `end` the payload of templates that end exactly here."""

    __slots__ = ("lit", "one", "rest", "end")

    def __init__(self) -> None:
        self.lit: dict[str, TrieNode] = {}
        self.one: TrieNode | None = None
        self.rest: Any = None
        self.end: Any = None


def walk(root: TrieNode, segs: list[str], start: int) -> list[Any]:
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


class MethodSets:
    """Payload of a path-trie terminal: rule indices by request method. `by_method[m]` already
    includes `any` (rules without a method list), so a lookup is one dict.get."""

    __slots__ = ("by_method", "any")

    def __init__(self, by_method: dict[str, frozenset[int]], any_: frozenset[int]) -> None:
        self.by_method = by_method
        self.any = any_


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    """Lookup structures built by the compiler (see evaluator for how they are used).

    - `exact_workloads`: SpiffeId -> indices of rules naming that exact ID;
    - `workload_tries`: trust domain -> trie over SPIFFE path segments for wildcard patterns
      (payload: frozenset of rule indices);
    - `any_workload`: indices of rules without `from.workloads` (they match every caller);
    - `path_root`: trie over request path segments (payload: `MethodSets`);
    - `residuals`: per rule, None or its `CompiledRule.residual` (token conditions, requirements),
      run only on rules the index found;
    - `verdicts`: the precomputed Verdict for each enforced outcome without a shadow difference;
    - `auth_root`: trie over `authentication` entry templates (payload: `MethodSets` of entry
      indices), `auth_requirements` the requirement of each entry;
    - `action_sets`: action name -> `MethodSets` whose `any` holds the indices of the rules
      naming that action in `to` (walked like one more path-trie terminal);
    - `action_root`: trie over action templates (payload: `MethodSets` of positions in
      `action_specs`), for `CompiledPolicy.action_for`.
    """

    exact_workloads: dict[SpiffeId, frozenset[int]]
    workload_tries: dict[str, TrieNode]
    path_root: TrieNode
    kinds: tuple[int, ...]
    allow_outcomes: tuple[Outcome, ...]
    deny_outcomes: tuple[Outcome, ...]
    verdicts_allow: tuple[Any, ...]
    verdicts_deny: tuple[Any, ...]
    has_shadow: bool
    any_workload: frozenset[int] = frozenset()
    residuals: tuple[Any, ...] = ()
    step_outcomes: tuple[Outcome | None, ...] = ()
    verdicts_step: tuple[Any, ...] = ()
    auth_root: TrieNode | None = None
    auth_requirements: tuple[AuthRequirement, ...] = ()
    action_sets: dict[str, MethodSets] = field(default_factory=dict)
    action_root: TrieNode | None = None
    action_specs: tuple[Any, ...] = ()
    #: memo: workload SpiffeId -> the rule indices its ID selects (a pure function of the index;
    #: a caller's ID is the same on every request of its connection). Bounded, cleared when full.
    workload_memo: dict = field(default_factory=dict, compare=False, repr=False)


def _first_match(root: "TrieNode | None", method: str, path: str) -> int:
    """The smallest entry number (file order) among the entries of a route trie (`root`, built
    by the index) whose route matches `method` + canonical `path`; -1 for none, for no trie, or
    for a path that does not start with "/". One trie walk."""
    if root is None or path[:1] != "/":
        return -1
    best = -1
    for ms in walk(root, path.split("/"), 1):
        cand = ms.by_method.get(method, ms.any)
        if cand:
            m = min(cand)
            if best < 0 or m < best:
                best = m
    return best


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One compiled policy revision. `trust_domains` are those its workload patterns name;
    `authentication` the entries of the `authentication` section, `actions` the compiled
    `actions` section (`actions.ActionSpec`), both in file order."""

    revision: str
    rules: tuple[CompiledRule, ...]
    trust_domains: frozenset[str]
    source: str = ""
    index: PolicyIndex | None = field(default=None, repr=False, compare=False)
    authentication: tuple[AuthEntry, ...] = ()
    actions: tuple[Any, ...] = ()

    def rule(self, rule_id: str) -> CompiledRule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None

    def authentication_for(self, method: str, path: str) -> AuthRequirement:
        """The first `authentication` entry (file order) whose route matches the request, else
        `DEFAULT_AUTH` (token optional, binding any). Indexed: one trie walk over the canonical
        path; a path that does not start with "/" matches no entry."""
        idx = self.index
        best = _first_match(idx.auth_root if idx is not None else None, method, path)
        return DEFAULT_AUTH if best < 0 else idx.auth_requirements[best]  # type: ignore[union-attr]

    def authentication_linear(self, method: str, path: str) -> AuthRequirement:
        """Reference semantics of `authentication_for`: entry by entry, first match wins."""
        for e in self.authentication:
            if e.route.matches(method, path):
                return e.requirement
        return DEFAULT_AUTH

    @property
    def has_actions(self) -> bool:
        """True when the policy defines actions (the listener then asks `action_for` whether a
        request needs its body inspected; without actions it never does)."""
        return self.index is not None and self.index.action_root is not None

    def action_for(self, method: str, path: str) -> Any:
        """The first action (file order) whose route matches the request: an
        `actions.ActionSpec`, or None. Indexed like `authentication_for`."""
        idx = self.index
        best = _first_match(idx.action_root if idx is not None else None, method, path)
        return None if best < 0 else idx.action_specs[best]  # type: ignore[union-attr]

    def action_linear(self, method: str, path: str) -> Any:
        """Reference semantics of `action_for`: action by action, first match wins."""
        for a in self.actions:
            if a.route.matches(method, path):
                return a
        return None

    def action(self, name: str) -> Any:
        """The action called `name`, or None."""
        for a in self.actions:
            if a.name == name:
                return a
        return None
