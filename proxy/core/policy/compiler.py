"""Policy compiler: a parsed policy document (YAML/JSON objects) -> `CompiledPolicy`, or ONE
`ConfigError` listing every problem with its key path (DESIGN rule 5).

Document (version 1):

    version: 1                      # required, the integer 1
    revision: "example-1"           # optional string; else the caller's `revision` argument
    rules:                          # required, non-empty list, evaluated in file order
      - id: frontend-reads-items    # required, unique, [A-Za-z0-9._:-]{1,128}
        effect: allow               # required: allow | deny
        shadow: false               # optional: evaluated and recorded, never enforced
        description: "..."          # optional
        from:
          workloads: [<SPIFFE ID pattern>, ...]   # required, non-empty
        to:                         # required, non-empty list of routes
          - methods: [GET, HEAD]    # optional (omitted = any); [] is an error; uppercase tokens
            paths: [<path template>, ...]         # required, non-empty

Rules checked here (each failure is a `Problem` at its path, all reported together):
- unknown keys, missing keys, wrong types, empty lists, an empty `rules` list, duplicate rule ids,
  an `effect` other than allow/deny, `version` other than 1, no revision at all;
- SPIFFE ID patterns: a SPIFFE ID (SPIFFE-ID.md section 2, via `core.spiffe.parse_spiffe_id`) in
  which whole path segments may be `*` (exactly one segment) or `**` (zero or more; last only);
  no wildcard in the trust domain and no partial wildcard (`sa-*`). When `known_trust_domains` is
  given, a pattern for any other trust domain can never match and is an error;
- path templates: start with "/"; segments are literals, `{name}` (one non-empty segment,
  identifier name, unique per template), `*` (one non-empty segment) or `**` (zero or more, last
  only); no partial wildcard, no empty segment except a trailing slash; literal segments must
  already be canonical (`core.paths.canonicalize_path`), else no canonical request could match;
- methods: RFC 9110 tokens in uppercase (methods are case-sensitive: `get` never matches `GET`).

The structural checks of `from` and of each route use `core.schema`; the rule and top level are
checked by hand because `from` is not a Python identifier. To extend a rule (subjects, actors,
actions, a CEL `when`), add the key to `_RULE_KEYS`, compile it in `_compile_rule`, and add its
index or residual check in `evaluator`.

Revision: the document's `revision` when present, else the `revision` argument (a bundle loader
passes the manifest revision); neither is a problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from proxy.core.model import Outcome, SpiffeId, Verdict
from proxy.core.paths import canonicalize_path
from proxy.core.policy.model import (
    ONE,
    REST,
    CompiledPolicy,
    CompiledRule,
    MethodSets,
    PathTemplate,
    PolicyIndex,
    Route,
    TrieNode,
    WorkloadPattern,
)
from proxy.core.schema import collect, join, meta
from proxy.core.spiffe import SCHEME, parse_spiffe_id
from proxy.errors import BadRequest, ConfigError, InvalidValue, Problem

SUPPORTED_VERSIONS = (1,)
RULE_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"

#: kinds[i] bit flags, read by the evaluator.
KIND_DENY = 1
KIND_SHADOW = 2

_TOP_KEYS = ("version", "revision", "rules")
_RULE_KEYS = ("id", "effect", "shadow", "description", "from", "to")

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class _RuleHead:
    id: str = field(metadata=meta(pattern=RULE_ID_PATTERN))
    effect: Literal["allow", "deny"]
    shadow: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class _FromSpec:
    workloads: tuple[str, ...] = field(metadata=meta(nonempty=True))


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    paths: tuple[str, ...] = field(metadata=meta(nonempty=True))
    methods: tuple[str, ...] | None = field(default=None, metadata=meta(nonempty=True))


def compile_policy(
    doc: Any,
    *,
    source: str = "",
    revision: str | None = None,
    known_trust_domains: frozenset[str] | None = None,
) -> CompiledPolicy:
    """Compile a parsed policy document; raise one `ConfigError(problems, source)` listing every
    problem found."""
    problems: list[Problem] = []
    if not isinstance(doc, Mapping):
        raise ConfigError([Problem("", f"policy must be a mapping; got {type(doc).__name__}")],
                          source=source)
    _unknown_keys(doc, _TOP_KEYS, "", problems)

    version = doc.get("version")
    if "version" not in doc:
        problems.append(Problem("version", "is required"))
    elif isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        problems.append(Problem("version", f"unsupported policy version {version!r} "
                                           f"(supported: {supported})"))

    final_revision = revision
    if "revision" in doc:
        doc_revision = doc["revision"]
        if not isinstance(doc_revision, str) or not doc_revision:
            problems.append(Problem("revision",
                                    f"must be a non-empty string; got {doc_revision!r}"))
        else:
            final_revision = doc_revision
    elif not revision:
        problems.append(Problem("revision", "is required (in the document or from the loader)"))

    rules: list[CompiledRule] = []
    raw_rules = doc.get("rules")
    if "rules" not in doc:
        problems.append(Problem("rules", "is required"))
    elif not isinstance(raw_rules, list):
        problems.append(Problem("rules", f"must be a list; got {type(raw_rules).__name__}"))
    elif not raw_rules:
        problems.append(Problem("rules", "must not be empty (an empty policy denies everything; "
                                         "say so with an explicit rule)"))
    else:
        first_seen: dict[str, int] = {}
        for i, raw in enumerate(raw_rules):
            rule = _compile_rule(raw, i, join("rules", i), problems, known_trust_domains)
            # Duplicates are checked on the raw id, so they are reported even for broken rules.
            rule_id = raw.get("id") if isinstance(raw, Mapping) else None
            if isinstance(rule_id, str):
                if rule_id in first_seen:
                    problems.append(Problem(join(join("rules", i), "id"),
                                            f"duplicate rule id {rule_id!r} "
                                            f"(first used at rules[{first_seen[rule_id]}])"))
                    continue
                first_seen[rule_id] = i
            if rule is not None:
                rules.append(rule)

    if problems:
        raise ConfigError(problems, source=source)
    assert final_revision is not None
    compiled_rules = tuple(rules)
    trust_domains = frozenset(w.trust_domain for r in compiled_rules for w in r.workloads)
    return CompiledPolicy(
        revision=final_revision,
        rules=compiled_rules,
        trust_domains=trust_domains,
        source=source,
        index=build_index(compiled_rules),
    )


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


def _unknown_keys(data: Mapping[Any, Any], known: tuple[str, ...], path: str,
                  problems: list[Problem]) -> None:
    for key in data:
        if key not in known:
            problems.append(Problem(join(path, str(key)),
                                    f"unknown key (known keys: {', '.join(sorted(known))})"))


def _compile_rule(raw: Any, index: int, path: str, problems: list[Problem],
                  known_tds: frozenset[str] | None) -> CompiledRule | None:
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(raw).__name__}"))
        return None
    before = len(problems)
    _unknown_keys(raw, _RULE_KEYS, path, problems)
    head_data = {k: raw[k] for k in ("id", "effect", "shadow", "description") if k in raw}
    head = collect(_RuleHead, head_data, path, problems)

    workloads: list[WorkloadPattern] = []
    from_path = join(path, "from")
    if "from" not in raw:
        problems.append(Problem(from_path, "is required"))
    else:
        spec = collect(_FromSpec, raw["from"], from_path, problems)
        if spec is not None:
            wpath = join(from_path, "workloads")
            for j, text in enumerate(spec.workloads):
                w = _compile_workload(text, join(wpath, j), problems, known_tds)
                if w is not None:
                    workloads.append(w)

    routes: list[Route] = []
    to_path = join(path, "to")
    raw_to = raw.get("to")
    if "to" not in raw:
        problems.append(Problem(to_path, "is required"))
    elif not isinstance(raw_to, list):
        problems.append(Problem(to_path, f"must be a list; got {type(raw_to).__name__}"))
    elif not raw_to:
        problems.append(Problem(to_path, "must not be empty"))
    else:
        for j, raw_route in enumerate(raw_to):
            route = _compile_route(raw_route, join(to_path, j), problems)
            if route is not None:
                routes.append(route)

    if head is None or len(problems) > before:
        return None
    return CompiledRule(
        id=head.id,
        index=index,
        effect=head.effect,
        shadow=head.shadow,
        description=head.description,
        workloads=tuple(workloads),
        routes=tuple(routes),
    )


def _compile_workload(text: str, path: str, problems: list[Problem],
                      known_tds: frozenset[str] | None) -> WorkloadPattern | None:
    """A SPIFFE ID whose whole path segments may be `*` or `**` (last only)."""
    if not text.startswith(SCHEME):
        problems.append(Problem(path, f"invalid SPIFFE ID pattern {text!r}: "
                                      "must start with spiffe://"))
        return None
    rest = text[len(SCHEME):]
    slash = rest.find("/")
    td, id_path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if "*" in td:
        problems.append(Problem(path, f"invalid SPIFFE ID pattern {text!r}: "
                                      "wildcards are not allowed in the trust domain"))
        return None
    segments = tuple(id_path[1:].split("/")) if id_path else ()
    ok = True
    for k, seg in enumerate(segments):
        if seg == REST and k != len(segments) - 1:
            problems.append(Problem(path, f"invalid SPIFFE ID pattern {text!r}: "
                                          "'**' is only allowed as the last segment"))
            ok = False
        elif "*" in seg and seg not in (ONE, REST):
            problems.append(Problem(path, f"invalid SPIFFE ID pattern {text!r}: a wildcard must "
                                          f"be a whole segment ('*' or '**'), not {seg!r}"))
            ok = False
    if not ok:
        return None
    # Validate everything else with the real parser, wildcards replaced by a valid segment.
    probe = SCHEME + td + "".join("/" + ("x" if s in (ONE, REST) else s) for s in segments)
    try:
        parsed = parse_spiffe_id(probe if segments else text)
    except InvalidValue as exc:
        problems.append(Problem(path, f"invalid SPIFFE ID pattern {text!r}: {exc.reason}"))
        return None
    if known_tds is not None and parsed.trust_domain not in known_tds:
        problems.append(Problem(path, f"can never match: no trust bundle for trust domain "
                                      f"{parsed.trust_domain}"))
        return None
    return WorkloadPattern(source=text, trust_domain=parsed.trust_domain, segments=segments)


def _compile_route(raw: Any, path: str, problems: list[Problem]) -> Route | None:
    spec = collect(_RouteSpec, raw, path, problems)
    if spec is None:
        return None
    ok = True
    methods: frozenset[str] | None = None
    if spec.methods is not None:
        mpath = join(path, "methods")
        for j, m in enumerate(spec.methods):
            if not _METHOD.fullmatch(m):
                problems.append(Problem(join(mpath, j), f"{m!r} is not an HTTP method token"))
                ok = False
            elif m != m.upper():
                problems.append(Problem(join(mpath, j), f"method {m!r} must be uppercase "
                                        f"({m.upper()!r}): methods are case-sensitive"))
                ok = False
        methods = frozenset(spec.methods)
    templates: list[PathTemplate] = []
    ppath = join(path, "paths")
    for j, text in enumerate(spec.paths):
        t = _compile_template(text, join(ppath, j), problems)
        if t is None:
            ok = False
        else:
            templates.append(t)
    return Route(methods=methods, paths=tuple(templates)) if ok else None


def _compile_template(text: str, path: str, problems: list[Problem]) -> PathTemplate | None:
    if not text.startswith("/"):
        problems.append(Problem(path, f"path template {text!r} must start with '/'"))
        return None
    segments = tuple(text[1:].split("/"))
    last = len(segments) - 1
    params: list[str] = []
    before = len(problems)

    def bad(msg: str) -> None:
        problems.append(Problem(path, f"path template {text!r}: {msg}"))

    for k, seg in enumerate(segments):
        if seg == REST:
            if k != last:
                bad("'**' is only allowed as the last segment")
        elif seg == ONE:
            pass
        elif "{" in seg or "}" in seg:
            m = _PARAM.fullmatch(seg)
            if m is None:
                bad(f"bad parameter segment {seg!r}: write '{{name}}' with an identifier name, "
                    "filling the whole segment")
            elif m.group(1) in params:
                bad(f"parameter {{{m.group(1)}}} is used twice")
            else:
                params.append(m.group(1))
        elif "*" in seg:
            bad(f"a wildcard must be a whole segment ('*' or '**'), not {seg!r}")
        elif seg == "" and k != last:
            bad("empty segment: requests have repeated slashes merged, so it can never match")
        else:
            literal = "/" + seg
            try:
                canonical = canonicalize_path(literal)
            except BadRequest as exc:
                bad(f"segment {seg!r} can never match a request: {exc.detail}")
                continue
            if canonical != literal:
                bad(f"segment {seg!r} is not canonical (requests arrive as "
                    f"{canonical[1:]!r}), so it can never match")
    if len(problems) > before:
        return None
    return PathTemplate(source=text, segments=segments, params=tuple(params))


# ------------------------------------------------------------------------------------------------
# Index
# ------------------------------------------------------------------------------------------------


def _insert(root: TrieNode, segments: tuple[str, ...], new_payload: Any) -> tuple[TrieNode, str]:
    """Walk/extend the trie for `segments`; return (node, "rest" | "end") where the payload
    belongs, creating it with `new_payload()` if absent."""
    node = root
    for seg in segments:
        if seg == REST:
            if node.rest is None:
                node.rest = new_payload()
            return node, "rest"
        if seg == ONE or seg[:1] == "{":
            if node.one is None:
                node.one = TrieNode()
            node = node.one
        else:
            child = node.lit.get(seg)
            if child is None:
                child = node.lit[seg] = TrieNode()
            node = child
    if node.end is None:
        node.end = new_payload()
    return node, "end"


def _freeze(node: TrieNode, convert: Any) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.rest is not None:
            n.rest = convert(n.rest)
        if n.end is not None:
            n.end = convert(n.end)
        stack.extend(n.lit.values())
        if n.one is not None:
            stack.append(n.one)


def _freeze_methods(d: dict[str | None, set[int]]) -> MethodSets:
    any_ = frozenset(d.get(None, ()))
    by_method = {m: frozenset(s) | any_ for m, s in d.items() if m is not None}
    return MethodSets(by_method, any_)


def build_index(rules: tuple[CompiledRule, ...]) -> PolicyIndex:
    """Build the lookup structures the evaluator uses (see `PolicyIndex`)."""
    exact: dict[SpiffeId, set[int]] = {}
    wtries: dict[str, TrieNode] = {}
    proot = TrieNode()
    for r in rules:
        i = r.index
        for w in r.workloads:
            if w.exact:
                sid = SpiffeId(w.trust_domain, "".join("/" + s for s in w.segments))
                exact.setdefault(sid, set()).add(i)
            else:
                root = wtries.setdefault(w.trust_domain, TrieNode())
                node, slot = _insert(root, w.segments, set)
                getattr(node, slot).add(i)
        for route in r.routes:
            methods: tuple[str | None, ...] = (None,) if route.methods is None \
                else tuple(route.methods)
            for t in route.paths:
                node, slot = _insert(proot, t.segments, dict)
                payload = getattr(node, slot)
                for m in methods:
                    payload.setdefault(m, set()).add(i)
    for root in wtries.values():
        _freeze(root, frozenset)
    _freeze(proot, _freeze_methods)

    kinds = tuple((KIND_DENY if r.effect == "deny" else 0) | (KIND_SHADOW if r.shadow else 0)
                  for r in rules)
    allow_outcomes = tuple(Outcome("allow", "allowed", r.id) for r in rules)
    deny_outcomes = tuple(Outcome("deny", "denied_by_rule", r.id) for r in rules)
    return PolicyIndex(
        exact_workloads={k: frozenset(v) for k, v in exact.items()},
        workload_tries=wtries,
        path_root=proot,
        kinds=kinds,
        allow_outcomes=allow_outcomes,
        deny_outcomes=deny_outcomes,
        verdicts_allow=tuple(Verdict(o) for o in allow_outcomes),
        verdicts_deny=tuple(Verdict(o) for o in deny_outcomes),
        has_shadow=any(r.shadow for r in rules),
    )
