"""Compiled policy values: what `compiler.compile_policy` builds and `evaluator.evaluate` reads.

Rules:
- Everything public is frozen; a `CompiledPolicy` is one immutable snapshot of one revision, shared
  by every request that took it (DESIGN section 3, "state is an immutable snapshot").
- Each compiled part keeps its `source` text so audit records and `config check` can quote it.
- Each matcher has a plain `matches()` method: the reference semantics, used by
  `evaluator.evaluate_linear` and by the tests to cross-check the indexed evaluator.
- The index (`PolicyIndex`) is built once by the compiler and never mutated afterwards; its dicts
  are plain dicts only because lookups on them are the hot path.

Segment wildcards (shared by workload patterns and path templates):
- `*` matches exactly one non-empty segment; `{name}` (path templates only) does the same and
  names it;
- `**` matches zero or more segments and may only be the last segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.core.model import Effect, Outcome, RequestContext, SpiffeId

ONE = "*"
REST = "**"


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
class CompiledRule:
    """One rule; `index` is its position in the file (order decides between matching rules)."""

    id: str
    index: int
    effect: Effect
    shadow: bool
    description: str
    workloads: tuple[WorkloadPattern, ...]
    routes: tuple[Route, ...]

    def matches(self, ctx: RequestContext) -> bool:
        """Reference semantics of a rule match (later: subjects, actors, actions, `when`)."""
        return (any(r.matches(ctx.method, ctx.path) for r in self.routes)
                and any(w.matches(ctx.workload) for w in self.workloads))


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
    - `path_root`: trie over request path segments (payload: `MethodSets`);
    - `verdicts`: the precomputed Verdict for each enforced outcome without a shadow difference.
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


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One compiled policy revision. `trust_domains` are those its workload patterns name."""

    revision: str
    rules: tuple[CompiledRule, ...]
    trust_domains: frozenset[str]
    source: str = ""
    index: PolicyIndex | None = field(default=None, repr=False, compare=False)

    def rule(self, rule_id: str) -> CompiledRule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None
