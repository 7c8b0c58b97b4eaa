"""Policy compiler: a parsed policy document (YAML/JSON objects) -> `CompiledPolicy`, or ONE
`ConfigError` listing every problem with its key path (DESIGN rule 5).

Document (version 1):

    version: 1                      # required, the integer 1
    revision: "example-1"           # optional string; else the caller's `revision` argument
    actions:                        # optional, non-empty list: named operations (see `actions`)
      - name: invoice.approve       # unique, [A-Za-z0-9_][A-Za-z0-9._:-]{0,127}
        methods: [POST]             # optional, as in routes
        paths: ["/api/invoices/{invoice_id}/approve"]   # required, as in routes
        max_body_bytes: 65536       # optional, 1..16 MiB (bounded body reads)
        max_json_depth: 32          # optional, 1..64 (nesting of the JSON body)
        params:                     # optional: name -> {from: path | query | body, name,
          invoice_id: {from: path}  #   pointer (body, RFC 6901), type (string | integer |
          amount: {from: body, pointer: /amount, type: number}   #   number | boolean | any),
                                    #   required (default true)}
    authentication:                 # optional, non-empty list; first match in file order wins
      - methods: [POST]             # optional (omitted = any), as in routes
        paths: ["/api/invoices/**"] # required, non-empty, path templates as in routes
        token: required             # required: required | optional | forbidden
        binding: dpop               # optional: dpop | mtls | any (DPoP or mTLS, no bearer) |
                                    #   none (an unbound bearer token is fine); default any,
                                    #   and none for token: forbidden (the only value allowed)
    rules:                          # required, non-empty list, evaluated in file order
      - id: frontend-reads-items    # required, unique, [A-Za-z0-9._:-]{1,128}
        effect: allow               # required: allow | deny
        shadow: false               # optional: evaluated and recorded, never enforced
        description: "..."          # optional
        from:                       # required: at least one selector; every given one must hold
          workloads: [<SPIFFE ID pattern>, ...]   # the mTLS peer (omitted = any workload)
          # token selectors (a rule with any of them never matches a request without a token):
          subjects: [{issuer: <exact iss>, sub: <exact sub or "*">}, ...]
          actors: [<SPIFFE ID pattern or exact string>, ...]     # actor `sub` (RFC 8693 act)
          actor_position: current   # current (default: actors[0] only) | any (anywhere in chain)
          clients: [<exact client_id>, ...]
          scopes: [<scope>, ...]    # ALL must be granted
          acr: [<acr>, ...]         # the token's acr is one of these
          amr: [<method>, ...]      # ALL must be present
          claims: {<name>: <string> | [<string>, ...]}  # top-level string claim equals one
        to:                         # required, non-empty list of routes and action entries
          - methods: [GET, HEAD]    # optional (omitted = any); [] is an error; uppercase tokens
            paths: [<path template>, ...]         # required, non-empty
          - actions: [invoice.approve]            # names from `actions`: the request is one
        require:                    # optional, allow rules only; needs a token
          peer_is: actor            # actor | client: the mTLS peer's SPIFFE ID equals the
                                    #   current actor's sub (resp. the token's client_id)
          max_delegation_depth: 1   # len(actors) <= N (N >= 0)
          acr_values: [urn:example:mfa]   # acr not one of these -> step_up (RFC 9470)
          max_auth_age_s: 300       # auth_time older than now - N -> step_up (N >= 1)
          authorization_details:    # RFC 9396: SOME entry of this type satisfies all of:
            type: invoice_approval  #   required
            match: {<entry field>: <request param>}   # equal as strings
            bounds: {<request param>: {le|lt|ge|gt: <entry field> | <number> | [..., ...]}}
        when: <CEL expression>      # optional, allow and deny rules: see `conditions` for the
                                    #   variables (request, workload, token, action, now)

Request parameters are path template captures (`{invoice_id}`) and query parameters, and, when
the request is one of the rule's actions, that action's typed parameters; a bound's
right side is an entry field name (a string) or a number literal (`{amount: {gt: 5000}}`), or a
list of them that must all hold (`{le: [max_amount, 10000]}`). See `params` for decoding and
number rules and `evaluator` for the semantics (step-up vs deny).

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
- methods: RFC 9110 tokens in uppercase (methods are case-sensitive: `get` never matches `GET`);
- `from`: at least one selector, no empty list; `actor_position` only with `actors`; actor patterns
  starting with spiffe:// are SPIFFE ID patterns (as workloads, trust domain not checked: tokens
  may name agents of other domains), other actor patterns are exact and must not contain `*`;
  scopes must be RFC 6749 scope-tokens; `claims` names non-empty, values strings, and never a claim
  that a verified token never carries as a string (exp, iat, nbf, auth_time, amr, act, cnf,
  authorization_details);
- `require`: allow rules only, non-empty; `max_delegation_depth: 0` with `from.actors` or
  `peer_is: actor` can never match, nor can `acr_values` disjoint from `from.acr`; with `peer_is: actor` (current position) an actor pattern
  that is not a SPIFFE ID (or, with `known_trust_domains`, names an unknown trust domain) can
  never match, nor can exact actors none of which is one of the (exact) `from.workloads`; and
  likewise `from.clients` with `peer_is: client`;
  `authorization_details`: non-empty `type`, `match` / `bounds` non-empty mappings with non-empty
  names, ops le/lt/ge/gt, right sides non-empty field names or finite numbers (not booleans);
  literal bounds of one parameter that contradict each other (`{gt: 10, le: 5}`) can never match;
- `actions`: a non-empty list; unknown keys, a missing or duplicate or malformed name, routes as
  above, `max_body_bytes` out of range, parameter names that are not identifiers, `from` other
  than path / query / body, a type that is not one of the five (`any` only for body), a body
  parameter without a valid RFC 6901 pointer (or a path/query one with a pointer), a path
  parameter whose capture some template of the action lacks, and an action every request of
  which an earlier action already takes (first match wins);
- `to: [{actions: [...]}]`: an entry with other keys, an empty list, an unknown action name;
  with only actions in `to`, `authorization_details` parameters that none of them declares;
- `when`: not a non-empty string, or a CEL problem (`core.cel`): a syntax error, an unknown
  variable, a field or key that does not exist (`request.params` has the captures of the rule's
  own templates; `action.params` the parameters its actions declare, or for a rule without
  actions those of any action), an operator or function on types it has no overload for, a
  result that is not a bool. A rule naming an action that is itself broken has its `when`
  checked once that action loads;
- `authentication`: a non-empty list; `binding` other than none with `token: forbidden`; an entry
  every request of which an earlier entry already matches (same or wider methods, templates
  covered segment by segment, e.g. the same entry twice, or `/api/**` before `/api/x`) can never
  decide anything.

The structural checks of `from` and of each route use `core.schema`; the rule and top level are
checked by hand because `from` is not a Python identifier. To extend a rule, add the key to
`_RULE_KEYS`, compile it in `_compile_rule`, and add its index or residual check
(`CompiledRule.residual`; `when` is `CompiledRule.residual_when`).

Revision: the document's `revision` when present, else the `revision` argument (a bundle loader
passes the manifest revision); neither is a problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

from proxy.core import cel
from proxy.core.model import Outcome, SpiffeId, Verdict
from proxy.core.paths import canonicalize_path
from proxy.core.policy.actions import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_BYTES_LIMIT,
    MAX_JSON_DEPTH,
    MAX_JSON_DEPTH_LIMIT,
    ActionSpec,
    ParamSpec,
    parse_pointer,
)
from proxy.core.policy.conditions import PARAM_CEL_TYPES, When, rule_env
from proxy.core.policy.model import (
    ONE,
    REST,
    ActorPattern,
    AuthEntry,
    AuthRequirement,
    Bound,
    CompiledPolicy,
    CompiledRule,
    DetailsRequirement,
    MethodSets,
    ParamSource,
    PathTemplate,
    PolicyIndex,
    Requirements,
    Route,
    TokenMatch,
    TrieNode,
    WorkloadPattern,
    _is_one,
)
from proxy.core.schema import collect, join, meta
from proxy.core.spiffe import SCHEME, parse_spiffe_id
from proxy.errors import BadRequest, ConfigError, InvalidValue, Problem

SUPPORTED_VERSIONS = (1,)
RULE_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"

#: kinds[i] bit flags, read by the evaluator.
KIND_DENY = 1
KIND_SHADOW = 2
KIND_RESIDUAL = 4  # the rule has token conditions or requirements: run `residuals[i]`

STEP_UP_CODE = "step_up_required"

_TOP_KEYS = ("version", "revision", "authentication", "actions", "rules")
_RULE_KEYS = ("id", "effect", "shadow", "description", "from", "to", "require", "when")
_ACTION_KEYS = ("name", "description", "methods", "paths", "max_body_bytes", "max_json_depth",
                "params")
_PARAM_KEYS = ("from", "name", "pointer", "type", "required")
_PARAM_TYPES = ("string", "integer", "number", "boolean", "any")
ACTION_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}"
_ACTION_NAME = re.compile(ACTION_NAME_PATTERN)
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SELECTORS = ("workloads", "subjects", "actors", "clients", "scopes", "acr", "amr", "claims")
_DETAILS_KEYS = ("type", "match", "bounds")
_BOUND_OPS = ("le", "lt", "ge", "gt")
#: claims a verified access token never carries as a string (core.tokens checks their types)
_NON_STRING_CLAIMS = frozenset({"exp", "iat", "nbf", "auth_time", "amr", "act", "cnf",
                                "authorization_details"})
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class _RuleHead:
    id: str = field(metadata=meta(pattern=RULE_ID_PATTERN))
    effect: Literal["allow", "deny"]
    shadow: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class _SubjectSpec:
    issuer: str = field(metadata=meta(nonempty=True))
    sub: str = field(metadata=meta(nonempty=True))


def _list() -> Any:
    return field(default=None, metadata=meta(nonempty=True))


@dataclass(frozen=True, slots=True)
class _FromSpec:
    workloads: tuple[str, ...] | None = _list()
    subjects: tuple[_SubjectSpec, ...] | None = _list()
    actors: tuple[str, ...] | None = _list()
    actor_position: Literal["current", "any"] | None = None
    clients: tuple[str, ...] | None = _list()
    scopes: tuple[str, ...] | None = _list()
    acr: tuple[str, ...] | None = _list()
    amr: tuple[str, ...] | None = _list()
    claims: dict[str, Any] | None = _list()


@dataclass(frozen=True, slots=True)
class _RequireSpec:
    peer_is: Literal["actor", "client"] | None = None
    max_delegation_depth: int | None = field(default=None, metadata=meta(min=0))
    acr_values: tuple[str, ...] | None = _list()
    max_auth_age_s: int | None = field(default=None, metadata=meta(min=1))
    authorization_details: Any = None


@dataclass(frozen=True, slots=True)
class _AuthSpec:
    paths: tuple[str, ...] = field(metadata=meta(nonempty=True))
    token: Literal["required", "optional", "forbidden"]
    methods: tuple[str, ...] | None = field(default=None, metadata=meta(nonempty=True))
    binding: Literal["dpop", "mtls", "any", "none"] | None = None


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

    authentication: tuple[AuthEntry, ...] = ()
    if "authentication" in doc:
        authentication = _compile_authentication(doc["authentication"], problems)
    actions: tuple[ActionSpec, ...] = ()
    if "actions" in doc:
        actions = _compile_actions(doc["actions"], problems)
    actions_by_name: dict[str, ActionSpec | None] = {a.name: a for a in actions}
    if isinstance(doc.get("actions"), list):  # declared but broken: reported once, above
        for item in doc["actions"]:
            name = item.get("name") if isinstance(item, Mapping) else None
            if isinstance(name, str) and name not in actions_by_name:
                actions_by_name[name] = None
    all_param_types = _action_param_types(actions)

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
            rule = _compile_rule(raw, i, join("rules", i), problems, known_trust_domains,
                                 actions_by_name, all_param_types)
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
        index=build_index(compiled_rules, authentication, actions),
        authentication=authentication,
        actions=actions,
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
                  known_tds: frozenset[str] | None,
                  actions_by_name: Mapping[str, ActionSpec | None] | None = None,
                  all_param_types: Mapping[str, Any] | None = None) -> CompiledRule | None:
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(raw).__name__}"))
        return None
    before = len(problems)
    _unknown_keys(raw, _RULE_KEYS, path, problems)
    head_data = {k: raw[k] for k in ("id", "effect", "shadow", "description") if k in raw}
    head = collect(_RuleHead, head_data, path, problems)

    workloads: list[WorkloadPattern] = []
    token: TokenMatch | None = None
    spec: _FromSpec | None = None
    from_path = join(path, "from")
    if "from" not in raw:
        problems.append(Problem(from_path, "is required"))
    else:
        spec = collect(_FromSpec, raw["from"], from_path, problems)
        if spec is not None:
            if all(getattr(spec, k) is None for k in _SELECTORS):
                problems.append(Problem(from_path, "needs at least one selector (one of "
                                                   f"{', '.join(_SELECTORS)})"))
            if spec.workloads is not None:
                wpath = join(from_path, "workloads")
                for j, text in enumerate(spec.workloads):
                    w = _compile_workload(text, join(wpath, j), problems, known_tds)
                    if w is not None:
                        workloads.append(w)
            token = _compile_token_match(spec, from_path, problems)

    routes: list[Route] = []
    action_names: dict[str, None] = {}
    to_path = join(path, "to")
    raw_to = raw.get("to")
    known_actions = actions_by_name or {}
    if "to" not in raw:
        problems.append(Problem(to_path, "is required"))
    elif not isinstance(raw_to, list):
        problems.append(Problem(to_path, f"must be a list; got {type(raw_to).__name__}"))
    elif not raw_to:
        problems.append(Problem(to_path, "must not be empty"))
    else:
        for j, raw_route in enumerate(raw_to):
            if isinstance(raw_route, Mapping) and "actions" in raw_route:
                _compile_to_actions(raw_route, join(to_path, j), problems, known_actions,
                                    action_names)
                continue
            route = _compile_route(raw_route, join(to_path, j), problems)
            if route is not None:
                routes.append(route)
    rule_actions = tuple(a for a in (known_actions.get(n) for n in action_names)
                         if a is not None)
    broken_actions = len(rule_actions) < len(action_names)

    require: Requirements | None = None
    if "require" in raw:
        req_path = join(path, "require")
        if head is not None and head.effect == "deny":
            problems.append(Problem(req_path, "only allow rules can have requirements (a deny "
                                              "rule that stopped matching when one fails would "
                                              "deny less); put conditions in `from`"))
        else:
            require = _compile_require(raw["require"], req_path, problems)
            if require is not None and spec is not None:
                _check_require_against_from(require, spec, path, problems, known_tds)
            if require is not None and require.authorization_details is not None and \
                    not routes and rule_actions and not broken_actions:
                _check_details_params(require.authorization_details, rule_actions,
                                      join(req_path, "authorization_details"), problems)

    sources = ParamSource.of(tuple(routes))
    when = None
    if "when" in raw and not broken_actions:  # else its variables are unknown: check it later
        param_types = _action_param_types(rule_actions) if action_names \
            else (all_param_types or {})
        when = _compile_when(raw["when"], join(path, "when"), problems, routes, sources,
                             param_types, bool(action_names))

    if head is None or len(problems) > before:
        return None
    if require is not None and require.authorization_details is not None:
        details = replace(require.authorization_details, sources=sources,
                          actions=frozenset(action_names))
        require = replace(require, authorization_details=details)
    step_up = None
    if require is not None and (require.acr_values or require.max_auth_age_s is not None):
        step_up = Outcome("step_up", STEP_UP_CODE, head.id, require.acr_values,
                          require.max_auth_age_s)
    return CompiledRule(
        id=head.id,
        index=index,
        effect=head.effect,
        shadow=head.shadow,
        description=head.description,
        workloads=tuple(workloads),
        routes=tuple(routes),
        token=token,
        require=require,
        step_up=step_up,
        actions=frozenset(action_names),
        when=when,
    )


def _compile_to_actions(raw: Mapping[str, Any], path: str, problems: list[Problem],
                        known: Mapping[str, ActionSpec | None], out: dict[str, None]) -> None:
    """A `to` entry `{actions: [name, ...]}`: names of actions of the `actions` section."""
    for key in raw:
        if key != "actions":
            problems.append(Problem(join(path, str(key)), "unknown key in an actions entry (a "
                                    "route with methods/paths is its own entry of `to`)"))
    apath = join(path, "actions")
    names = raw["actions"]
    if not isinstance(names, list):
        problems.append(Problem(apath, f"must be a list; got {type(names).__name__}"))
        return
    if not names:
        problems.append(Problem(apath, "must not be empty"))
        return
    for k, name in enumerate(names):
        if not isinstance(name, str):
            problems.append(Problem(join(apath, k), f"must be a string; got {name!r}"))
        elif name not in known:
            avail = ", ".join(known) or "none: add an `actions` section"
            problems.append(Problem(join(apath, k), f"unknown action {name!r} (actions: "
                                                    f"{avail})"))
        else:
            out[name] = None


def _action_param_types(actions: tuple[ActionSpec, ...]) -> dict[str, Any]:
    """Parameter name -> CEL type over these actions (dyn where they disagree)."""
    out: dict[str, Any] = {}
    for a in actions:
        for p in a.params:
            t = PARAM_CEL_TYPES[p.type]
            out[p.name] = t if out.get(p.name, t) == t else cel.DYN
    return out


def _compile_when(raw: Any, path: str, problems: list[Problem], routes: list[Route],
                  sources: tuple[ParamSource, ...], param_types: Mapping[str, Any],
                  own_actions: bool) -> When | None:
    if not isinstance(raw, str) or not raw.strip():
        problems.append(Problem(path, "must be a non-empty CEL expression (a string)"))
        return None
    captures = tuple(dict.fromkeys(c for r in routes for t in r.paths for c in t.params))
    try:
        condition = _condition(raw, captures, tuple(sorted(param_types.items())))
    except cel.CelCompileError as exc:
        msg = exc.message
        if "action.params" in msg and not own_actions:
            msg += " (a rule without `to: [{actions: ...}]` sees the parameters that some " \
                   "action of the policy declares)"
        problems.append(Problem(path, msg))
        return None
    return When(condition, sources)


@lru_cache(maxsize=4096)
def _condition(raw: str, captures: tuple[str, ...],
               param_types: tuple[tuple[str, Any], ...]) -> cel.Condition:
    """`cel.compile_condition` memoised on everything it depends on (the text and the rule's
    variables): rules that repeat a condition, and later bundle revisions that keep it, share one
    compiled program (compiled once, held once, one object hot in the cache when evaluating).
    A Condition is immutable; failures raise and are not cached."""
    return cel.compile_condition(raw, rule_env(captures, dict(param_types)))


def _check_details_params(details: DetailsRequirement, actions: tuple[ActionSpec, ...],
                          path: str, problems: list[Problem]) -> None:
    """A rule that matches only through actions reads only their parameters."""
    declared = {p.name for a in actions for p in a.params}
    names = ", ".join(a.name for a in actions)
    for fld, param in details.match:
        if param not in declared:
            problems.append(Problem(join(join(path, "match"), fld),
                                    f"can never match: none of the rule's actions ({names}) "
                                    f"declares the parameter {param!r}"))
    for b in dict.fromkeys(b.param for b in details.bounds):
        if b not in declared:
            problems.append(Problem(join(join(path, "bounds"), b),
                                    f"can never match: none of the rule's actions ({names}) "
                                    f"declares the parameter {b!r}"))


# ------------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------------


def _bounded_int(item: Mapping[str, Any], key: str, default: int, limit: int, path: str,
                 problems: list[Problem]) -> int:
    """`item[key]` (or `default`) when it is an integer 1..limit; else a problem at `path.key`."""
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        problems.append(Problem(join(path, key), f"must be an integer 1..{limit}; got {value!r}"))
    return value


def _compile_actions(raw: Any, problems: list[Problem]) -> tuple[ActionSpec, ...]:
    path = "actions"
    if not isinstance(raw, list):
        problems.append(Problem(path, f"must be a list; got {type(raw).__name__}"))
        return ()
    if not raw:
        problems.append(Problem(path, "must not be empty (omit the section)"))
        return ()
    out: list[ActionSpec] = []
    earlier = _ShadowIndex()
    first_seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        apath = join(path, i)
        if not isinstance(item, Mapping):
            problems.append(Problem(apath, f"must be a mapping; got {type(item).__name__}"))
            continue
        before = len(problems)
        _unknown_keys(item, _ACTION_KEYS, apath, problems)
        name = item.get("name")
        npath = join(apath, "name")
        if "name" not in item:
            problems.append(Problem(npath, "is required"))
        elif not isinstance(name, str) or not _ACTION_NAME.fullmatch(name):
            problems.append(Problem(npath, f"must match {ACTION_NAME_PATTERN}; got {name!r}"))
        elif name in first_seen:
            problems.append(Problem(npath, f"duplicate action name {name!r} (first used at "
                                           f"actions[{first_seen[name]}])"))
        else:
            first_seen[name] = i
        description = item.get("description", "")
        if not isinstance(description, str):
            problems.append(Problem(join(apath, "description"), "must be a string"))
        max_body = _bounded_int(item, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, MAX_BODY_BYTES_LIMIT,
                                apath, problems)
        max_depth = _bounded_int(item, "max_json_depth", MAX_JSON_DEPTH, MAX_JSON_DEPTH_LIMIT,
                                 apath, problems)
        route_raw = {k: item[k] for k in ("methods", "paths") if k in item}
        route = _compile_route(route_raw, apath, problems)
        params = _compile_params(item.get("params"), "params" in item, join(apath, "params"),
                                 route, problems)
        if len(problems) > before or route is None:
            continue
        spec = ActionSpec(name=name, index=i, route=route, params=params,
                          max_body_bytes=max_body, description=description,
                          max_json_depth=max_depth)
        shadowed_by = _shadowed_by(route, earlier.candidates(route))  # type: ignore[arg-type]
        if shadowed_by:
            names = ", ".join(f"actions[{k}]" for k in shadowed_by)
            problems.append(Problem(apath, f"can never match: every request it covers is "
                                           f"matched first by {names} (first match wins)"))
            continue
        out.append(spec)
        earlier.add(spec)
    return tuple(out)


class _ShadowIndex:
    """Earlier entries by the first segment of their templates, so that the shadowing check of
    a section of n entries is not n * n template comparisons: an earlier template can only cover
    one whose first segment is a literal equal to its own, unless its own is a wildcard."""

    def __init__(self) -> None:
        self.by_first: dict[str, list[Any]] = {}
        self.wild: list[Any] = []

    def add(self, entry: Any) -> None:
        firsts = {t.segments[0] for t in entry.route.paths}
        if any(f == REST or _is_one(f) for f in firsts):
            self.wild.append(entry)
        else:
            for f in firsts:
                self.by_first.setdefault(f, []).append(entry)

    def candidates(self, route: Route) -> list[Any]:
        found = {e.index: e for e in self.wild}
        for t in route.paths:
            for e in self.by_first.get(t.segments[0], ()):
                found[e.index] = e
        return [found[k] for k in sorted(found)]


def _compile_params(raw: Any, present: bool, path: str, route: Route | None,
                    problems: list[Problem]) -> tuple[ParamSpec, ...]:
    if not present:
        return ()
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(raw).__name__}"))
        return ()
    if not raw:
        problems.append(Problem(path, "must not be empty (omit `params`)"))
        return ()
    out: list[ParamSpec] = []
    for pname, spec in raw.items():
        ppath = join(path, str(pname))
        if not isinstance(pname, str) or not _PARAM_NAME.fullmatch(pname):
            problems.append(Problem(ppath, "parameter names are identifiers "
                                           "([A-Za-z_][A-Za-z0-9_]*, at most 64)"))
            continue
        if not isinstance(spec, Mapping):
            problems.append(Problem(ppath, "must be a mapping like {from: path | query | body}"))
            continue
        before = len(problems)
        _unknown_keys(spec, _PARAM_KEYS, ppath, problems)
        src = spec.get("from")
        if "from" not in spec:
            problems.append(Problem(join(ppath, "from"), "is required (path, query or body)"))
        elif src not in ("path", "query", "body"):
            problems.append(Problem(join(ppath, "from"),
                                    f"must be one of path, query, body; got {src!r}"))
        ptype = spec.get("type", "any" if src == "body" else "string")
        if ptype not in _PARAM_TYPES:
            problems.append(Problem(join(ppath, "type"), f"must be one of "
                                    f"{', '.join(_PARAM_TYPES)}; got {ptype!r}"))
        elif ptype == "any" and src in ("path", "query"):
            problems.append(Problem(join(ppath, "type"), "any is for body parameters (a "
                                                         f"{src} parameter is text)"))
        required = spec.get("required", True)
        if not isinstance(required, bool):
            problems.append(Problem(join(ppath, "required"), "must be true or false"))
        key = pname
        pointer: tuple[str, ...] = ()
        if src == "body":
            if "name" in spec:
                problems.append(Problem(join(ppath, "name"), "a body parameter is found by "
                                                             "its pointer"))
            text = spec.get("pointer")
            if "pointer" not in spec:
                problems.append(Problem(join(ppath, "pointer"), "is required for a body "
                                        "parameter (RFC 6901, like /amount)"))
            elif not isinstance(text, str) or parse_pointer(text) is None:
                problems.append(Problem(join(ppath, "pointer"),
                                        f"not an RFC 6901 JSON pointer: {text!r} (\"\" or "
                                        "/a/b; ~0 is ~ and ~1 is /)"))
            else:
                key, pointer = text, parse_pointer(text)  # type: ignore[assignment]
        elif src in ("path", "query"):
            if "pointer" in spec:
                problems.append(Problem(join(ppath, "pointer"), "only body parameters have a "
                                                                "pointer"))
            if "name" in spec:
                key = spec["name"]
                if not isinstance(key, str) or not key:
                    problems.append(Problem(join(ppath, "name"), "must be a non-empty string"))
            if src == "path" and route is not None and isinstance(key, str):
                where = join(ppath, "name") if "name" in spec else join(ppath, "from")
                for k, t in enumerate(route.paths):
                    if key not in t.params:
                        problems.append(Problem(where, f"paths[{k}] {t.source!r} has no "
                                                       f"{{{key}}} capture"))
        if len(problems) > before:
            continue
        out.append(ParamSpec(name=pname, source=src, key=key, type=ptype, required=required,
                             pointer=pointer))
    return tuple(out)


def _strings(values: tuple[str, ...], path: str, problems: list[Problem]) -> frozenset[str]:
    for j, v in enumerate(values):
        if not v:
            problems.append(Problem(join(path, j), "must not be empty"))
    return frozenset(values)


def _compile_token_match(spec: _FromSpec, path: str,
                         problems: list[Problem]) -> TokenMatch | None:
    """The token selectors of `from` (None when the rule has none)."""
    if all(getattr(spec, k) is None for k in _SELECTORS if k != "workloads"):
        if spec.actor_position is not None:
            problems.append(Problem(join(path, "actor_position"), "has no effect without actors"))
        return None
    subjects: dict[str, frozenset[str] | None] | None = None
    if spec.subjects is not None:
        acc: dict[str, set[str] | None] = {}
        for s in spec.subjects:
            if s.sub == "*":
                acc[s.issuer] = None
            else:
                subs = acc.setdefault(s.issuer, set())
                if subs is not None:
                    subs.add(s.sub)
        subjects = {k: (None if v is None else frozenset(v)) for k, v in acc.items()}
    actors: list[ActorPattern] = []
    if spec.actors is not None:
        apath = join(path, "actors")
        for j, text in enumerate(spec.actors):
            a = _compile_actor(text, join(apath, j), problems)
            if a is not None:
                actors.append(a)
    elif spec.actor_position is not None:
        problems.append(Problem(join(path, "actor_position"), "has no effect without actors"))
    scopes: frozenset[str] = frozenset()
    if spec.scopes is not None:
        spath = join(path, "scopes")
        for j, sc in enumerate(spec.scopes):
            if not _SCOPE_TOKEN.fullmatch(sc):
                problems.append(Problem(join(spath, j), f"{sc!r} is not an RFC 6749 scope-token "
                                                        "(no token can grant it)"))
        scopes = frozenset(spec.scopes)
    claims: list[tuple[str, frozenset[str]]] = []
    if spec.claims is not None:
        cpath = join(path, "claims")
        for name, value in spec.claims.items():
            npath = join(cpath, name)
            if not name:
                problems.append(Problem(cpath, "claim names must not be empty"))
            elif name in _NON_STRING_CLAIMS:
                problems.append(Problem(npath, f"can never match: {name!r} is never a string "
                                               "claim (use the dedicated selector)"))
            elif isinstance(value, str):
                claims.append((name, frozenset((value,))))
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                claims.append((name, frozenset(value)))
            elif isinstance(value, list) and not value:
                problems.append(Problem(npath, "must not be empty"))
            else:
                problems.append(Problem(npath, "must be a string or a list of strings (claims "
                                               f"match top-level string claims); got {value!r}"))
    return TokenMatch(
        subjects=None if subjects is None else MappingProxyType(subjects),
        actors=tuple(actors),
        actor_position=spec.actor_position or "current",
        clients=None if spec.clients is None else _strings(spec.clients, join(path, "clients"),
                                                           problems),
        scopes=scopes,
        acr=None if spec.acr is None else _strings(spec.acr, join(path, "acr"), problems),
        amr=frozenset() if spec.amr is None else _strings(spec.amr, join(path, "amr"), problems),
        claims=tuple(claims),
    )


def _compile_actor(text: str, path: str, problems: list[Problem]) -> ActorPattern | None:
    if not text:
        problems.append(Problem(path, "must not be empty"))
        return None
    if text.startswith(SCHEME):
        w = _compile_workload(text, path, problems, None)
        return None if w is None else ActorPattern(source=text, spiffe=w)
    if "*" in text:
        problems.append(Problem(path, f"{text!r}: wildcards are only allowed in SPIFFE ID "
                                      "patterns (spiffe://...); other actor names are exact"))
        return None
    return ActorPattern(source=text)


def _compile_require(raw: Any, path: str, problems: list[Problem]) -> Requirements | None:
    before = len(problems)
    if raw is None or isinstance(raw, Mapping) and not raw:
        problems.append(Problem(path, "must not be empty (omit `require` instead)"))
        return None
    spec = collect(_RequireSpec, raw, path, problems)
    details = None
    if isinstance(raw, Mapping) and "authorization_details" in raw:
        details = _compile_details(raw["authorization_details"],
                                   join(path, "authorization_details"), problems)
    if spec is None or len(problems) > before:
        return None
    acr_values = spec.acr_values or ()
    for j, v in enumerate(acr_values):
        if not v:
            problems.append(Problem(join(join(path, "acr_values"), j), "must not be empty"))
    return Requirements(
        peer_is=spec.peer_is,
        max_delegation_depth=spec.max_delegation_depth,
        acr_values=tuple(acr_values),
        max_auth_age_s=spec.max_auth_age_s,
        authorization_details=details,
    )


def _check_require_against_from(req: Requirements, spec: _FromSpec, path: str,
                                problems: list[Problem], known_tds: frozenset[str] | None) -> None:
    """Combinations of `from` and `require` that can never match."""
    from_path = join(path, "from")
    if req.max_delegation_depth == 0:
        why = ("from.actors" if spec.actors is not None
               else "peer_is: actor" if req.peer_is == "actor" else None)
        if why is not None:
            problems.append(Problem(join(join(path, "require"), "max_delegation_depth"),
                                    f"can never match: {why} needs an actor, but "
                                    "max_delegation_depth 0 allows none"))
    if req.acr_values and spec.acr is not None and not set(req.acr_values) & set(spec.acr):
        problems.append(Problem(join(join(path, "require"), "acr_values"),
                                "can never match: from.acr admits none of these values, so a "
                                "step-up could never lead to an allow"))
    peer_values: tuple[str, ...] | None = None
    if req.peer_is == "actor" and spec.actors is not None and spec.actor_position != "any":
        peer_values, key, what = spec.actors, "actors", "the current actor"
    elif req.peer_is == "client" and spec.clients is not None:
        peer_values, key, what = spec.clients, "clients", "the client_id"
    if peer_values is None:
        return
    before = len(problems)
    for j, text in enumerate(peer_values):
        _check_peer_id(text, join(join(from_path, key), j), what, problems, known_tds)
    # Exact workloads and exact peer values that share no ID: the peer can never be both.
    if len(problems) == before and spec.workloads is not None and not any(
            "*" in v for v in (*spec.workloads, *peer_values)) \
            and not set(spec.workloads) & set(peer_values):
        problems.append(Problem(join(from_path, key),
                                f"can never match: with require.peer_is {what} is the mTLS "
                                "peer, and none of these is one of from.workloads"))


def _check_peer_id(text: str, path: str, what: str, problems: list[Problem],
                   known_tds: frozenset[str] | None) -> None:
    if not text.startswith(SCHEME):
        problems.append(Problem(path, f"can never match: with require.peer_is {what} must be "
                                      f"the mTLS peer's SPIFFE ID, and {text!r} is not one"))
        return
    if known_tds is not None:
        rest = text[len(SCHEME):]
        td = rest.split("/", 1)[0]
        if td and "*" not in td and td not in known_tds:
            problems.append(Problem(path, f"can never match: with require.peer_is {what} must "
                                          "be the mTLS peer's SPIFFE ID, and there is no trust "
                                          f"bundle for trust domain {td}"))


def _compile_details(raw: Any, path: str, problems: list[Problem]) -> DetailsRequirement | None:
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(raw).__name__}"))
        return None
    before = len(problems)
    _unknown_keys(raw, _DETAILS_KEYS, path, problems)
    dtype = raw.get("type")
    if "type" not in raw:
        problems.append(Problem(join(path, "type"), "is required"))
    elif not isinstance(dtype, str) or not dtype:
        problems.append(Problem(join(path, "type"), f"must be a non-empty string; got {dtype!r}"))

    match: list[tuple[str, str]] = []
    if "match" in raw:
        mpath = join(path, "match")
        for fld, param in _nonempty_mapping(raw["match"], mpath, "entry field", problems):
            if not isinstance(param, str) or not param:
                problems.append(Problem(join(mpath, fld), "must name a request parameter (a "
                                        "path capture or a query parameter); got "
                                        f"{param!r}"))
            else:
                match.append((fld, param))

    bounds: list[Bound] = []
    if "bounds" in raw:
        bpath = join(path, "bounds")
        for param, ops in _nonempty_mapping(raw["bounds"], bpath, "request parameter", problems):
            ppath = join(bpath, param)
            literal_bounds: list[Bound] = []
            for op, rhs in _nonempty_mapping(ops, ppath, "operator", problems):
                opath = join(ppath, op)
                if op not in _BOUND_OPS:
                    problems.append(Problem(opath, f"unknown operator (known: "
                                                   f"{', '.join(_BOUND_OPS)})"))
                    continue
                items = rhs if isinstance(rhs, list) else [rhs]
                if not items:
                    problems.append(Problem(opath, "must not be empty"))
                for k, item in enumerate(items):
                    ipath = join(opath, k) if isinstance(rhs, list) else opath
                    b = _compile_bound(param, op, item, ipath, problems)
                    if b is not None:
                        bounds.append(b)
                        if b.literal is not None:
                            literal_bounds.append(b)
            _check_literal_bounds(literal_bounds, ppath, problems)
    if len(problems) > before:
        return None
    return DetailsRequirement(type=dtype, match=tuple(match), bounds=tuple(bounds))


def _nonempty_mapping(raw: Any, path: str, what: str,
                      problems: list[Problem]) -> list[tuple[str, Any]]:
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(raw).__name__}"))
        return []
    if not raw:
        problems.append(Problem(path, "must not be empty"))
        return []
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            problems.append(Problem(path, f"{what} names must be non-empty strings; got {key!r}"))
        else:
            out.append((key, value))
    return out


def _compile_bound(param: str, op: Any, rhs: Any, path: str,
                   problems: list[Problem]) -> Bound | None:
    if isinstance(rhs, str):
        if not rhs:
            problems.append(Problem(path, "must name an authorization_details field or be a "
                                          "number; got ''"))
            return None
        return Bound(param=param, op=op, field=rhs)
    if isinstance(rhs, bool) or not isinstance(rhs, (int, float)):
        problems.append(Problem(path, "must name an authorization_details field (a string) or "
                                      f"be a number; got {rhs!r}"))
        return None
    if isinstance(rhs, float) and not math.isfinite(rhs):
        problems.append(Problem(path, f"must be a finite number; got {rhs!r}"))
        return None
    literal = rhs if isinstance(rhs, int) else Decimal(repr(rhs))
    if isinstance(literal, Decimal) and literal == literal.to_integral_value():
        literal = int(literal)  # 5000.0: compare as the integer
    return Bound(param=param, op=op, literal=literal)


def _check_literal_bounds(bounds: list[Bound], path: str, problems: list[Problem]) -> None:
    """Literal bounds of one parameter whose intersection is empty can never hold."""
    lo: tuple[Any, bool] | None = None  # (value, strict)
    hi: tuple[Any, bool] | None = None
    for b in bounds:
        v = b.literal
        assert v is not None
        if b.op in ("ge", "gt"):
            cand = (v, b.op == "gt")
            if lo is None or cand[0] > lo[0] or (cand[0] == lo[0] and cand[1]):
                lo = cand
        else:
            cand = (v, b.op == "lt")
            if hi is None or cand[0] < hi[0] or (cand[0] == hi[0] and cand[1]):
                hi = cand
    if lo is not None and hi is not None and (lo[0] > hi[0] or
                                              (lo[0] == hi[0] and (lo[1] or hi[1]))):
        problems.append(Problem(path, "can never match: its number literals contradict each "
                                      "other (no value is above the lower and below the upper "
                                      "bound)"))


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
    return _route(spec.methods, spec.paths, path, problems)


def _route(raw_methods: tuple[str, ...] | None, raw_paths: tuple[str, ...], path: str,
           problems: list[Problem]) -> Route | None:
    ok = True
    methods: frozenset[str] | None = None
    if raw_methods is not None:
        mpath = join(path, "methods")
        for j, m in enumerate(raw_methods):
            if not _METHOD.fullmatch(m):
                problems.append(Problem(join(mpath, j), f"{m!r} is not an HTTP method token"))
                ok = False
            elif m != m.upper():
                problems.append(Problem(join(mpath, j), f"method {m!r} must be uppercase "
                                        f"({m.upper()!r}): methods are case-sensitive"))
                ok = False
        methods = frozenset(raw_methods)
    templates: list[PathTemplate] = []
    ppath = join(path, "paths")
    for j, text in enumerate(raw_paths):
        t = _compile_template(text, join(ppath, j), problems)
        if t is None:
            ok = False
        else:
            templates.append(t)
    return Route(methods=methods, paths=tuple(templates)) if ok else None


# ------------------------------------------------------------------------------------------------
# Authentication requirements
# ------------------------------------------------------------------------------------------------


def _compile_authentication(raw: Any, problems: list[Problem]) -> tuple[AuthEntry, ...]:
    path = "authentication"
    if not isinstance(raw, list):
        problems.append(Problem(path, f"must be a list; got {type(raw).__name__}"))
        return ()
    if not raw:
        problems.append(Problem(path, "must not be empty (omit the section: every route then "
                                      "has token optional, binding any)"))
        return ()
    entries: list[AuthEntry] = []
    earlier = _ShadowIndex()
    for i, item in enumerate(raw):
        epath = join(path, i)
        spec = collect(_AuthSpec, item, epath, problems)
        if spec is None:
            continue
        route = _route(spec.methods, spec.paths, epath, problems)
        binding = spec.binding
        if binding is None:
            binding = "none" if spec.token == "forbidden" else "any"
        elif spec.token == "forbidden" and binding != "none":
            problems.append(Problem(join(epath, "binding"),
                                    f"binding {binding} with token: forbidden: there is no token "
                                    "to bind (use none, or omit binding)"))
            continue
        if route is None:
            continue
        shadowed_by = _shadowed_by(route, earlier.candidates(route))
        if shadowed_by:
            names = ", ".join(f"authentication[{k}]" for k in shadowed_by)
            problems.append(Problem(epath, f"can never match: every request it covers is "
                                           f"matched first by {names} (first match wins)"))
            continue
        entry = AuthEntry(index=i, route=route, requirement=AuthRequirement(spec.token, binding, i))
        entries.append(entry)
        earlier.add(entry)
    return tuple(entries)


def _template_covers(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Does template `a` match every path template `b` matches? (segment by segment)"""
    for k, sa in enumerate(a):
        if sa == REST:
            return True
        if k >= len(b):
            return False
        sb = b[k]
        if sb == REST:
            return False
        if _is_one(sa):
            if not _is_one(sb) and sb == "":
                return False
        elif _is_one(sb) or sa != sb:
            return False
    return len(a) == len(b)


def _shadowed_by(route: Route, earlier: list[AuthEntry]) -> list[int]:
    """Indices of earlier entries that together match every request `route` matches, each
    (method, template) of `route` being covered by one earlier entry; [] when some request can
    reach this entry."""
    methods: tuple[str | None, ...] = (None,) if route.methods is None \
        else tuple(sorted(route.methods))
    used: set[int] = set()
    for m in methods:
        for t in route.paths:
            for e in earlier:
                em = e.route.methods
                if em is not None and (m is None or m not in em):
                    continue
                if any(_template_covers(et.segments, t.segments) for et in e.route.paths):
                    used.add(e.index)
                    break
            else:
                return []
    return sorted(used)


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


def build_index(rules: tuple[CompiledRule, ...],
                authentication: tuple[AuthEntry, ...] = (),
                actions: tuple[ActionSpec, ...] = ()) -> PolicyIndex:
    """Build the lookup structures the evaluator uses (see `PolicyIndex`)."""
    exact: dict[SpiffeId, set[int]] = {}
    wtries: dict[str, TrieNode] = {}
    any_workload: set[int] = set()
    proot = TrieNode()
    for r in rules:
        i = r.index
        if not r.workloads:
            any_workload.add(i)
        for w in r.workloads:
            if w.exact:
                sid = SpiffeId(w.trust_domain, "".join("/" + s for s in w.segments))
                exact.setdefault(sid, set()).add(i)
            else:
                root = wtries.setdefault(w.trust_domain, TrieNode())
                node, slot = _insert(root, w.segments, set)
                getattr(node, slot).add(i)
        for route in r.routes:
            _index_route(proot, route, i)
    for root in wtries.values():
        _freeze(root, frozenset)
    _freeze(proot, _freeze_methods)

    auth_root = None
    if authentication:
        auth_root = TrieNode()
        for pos, e in enumerate(authentication):  # payload: position in `authentication`
            _index_route(auth_root, e.route, pos)
        _freeze(auth_root, _freeze_methods)

    by_action: dict[str, set[int]] = {}
    for r in rules:
        for name in r.actions:
            by_action.setdefault(name, set()).add(r.index)
    action_sets = {name: MethodSets({}, frozenset(ix)) for name, ix in by_action.items()}
    action_root = None
    if actions:
        action_root = TrieNode()
        for pos, a in enumerate(actions):  # payload: position in `actions`
            _index_route(action_root, a.route, pos)
        _freeze(action_root, _freeze_methods)

    kinds = tuple((KIND_DENY if r.effect == "deny" else 0) | (KIND_SHADOW if r.shadow else 0)
                  | (KIND_RESIDUAL if r.has_residual else 0)
                  for r in rules)
    step_outcomes = tuple(r.step_up for r in rules)
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
        any_workload=frozenset(any_workload),
        residuals=tuple((r.residual if r.when is None else r.residual_when)
                        if r.has_residual else None for r in rules),
        step_outcomes=step_outcomes,
        verdicts_step=tuple(None if o is None else Verdict(o) for o in step_outcomes),
        auth_root=auth_root,
        auth_requirements=tuple(e.requirement for e in authentication),
        action_sets=action_sets,
        action_root=action_root,
        action_specs=tuple(actions),
    )


def _index_route(root: TrieNode, route: Route, i: int) -> None:
    methods: tuple[str | None, ...] = (None,) if route.methods is None else tuple(route.methods)
    for t in route.paths:
        node, slot = _insert(root, t.segments, dict)
        payload = getattr(node, slot)
        for m in methods:
            payload.setdefault(m, set()).add(i)
