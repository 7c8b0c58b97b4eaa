"""`when:` conditions of policy rules: the CEL variables of the decision phase, and their values.

Declared variables (`rule_env`), all checked at load (`core.cel`): a reference to anything else,
or to a field they do not have, is a load error at `rules[i].when`.

    request   object: method string, path string (canonical), query map(string, string),
              params map(string, string) -- the captures of the rule's own path template that
              matched (only the capture names of the rule's templates exist)
    workload  object: spiffe_id, trust_domain, path (strings) -- the verified mTLS peer
    token     object: present bool, iss, sub, client_id, acr (strings, "" when absent),
              scopes list(string) (sorted), amr list(string), auth_time int (0 when absent),
              claims map(string, dyn) (every claim as verified), actors list(string) (the `act`
              chain's subs, current actor first), authorization_details list(map(string, dyn))
              -- without a token: present false, strings "", lists and maps empty, auth_time 0,
              so a condition on a field never errors for lack of a token
    action    object: name string ("" when the request is no action), params: the action's
              parameters with their declared types (string, int for integer, double for
              number, bool, dyn for any) -- only names that one of the rule's actions declares
              (for a rule without `actions`, one that some action of the policy declares)
    now       timestamp (UTC) -- the `now` passed to evaluate; without one, every reference
              to it is an error

Values that do not exist are errors (CEL semantics), and an error fails closed: an allow rule
whose condition errors does not match; a deny rule whose condition errors DOES match (denies).
What does not exist: a missing map key or list index, `request.query` when the query names a
parameter twice (exactly or under a spelling lenient frameworks fold together, `params`) or
cannot be decoded (all or nothing: upstream might read another value than the condition did),
`request.params.x` when the rule matched through an action rather than a template, an optional
action parameter that was not sent, `now` without a time.
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Mapping

from proxy.core import cel
from proxy.core.cel import MISSING, Condition, Ref, to_cel
from proxy.core.model import RequestContext
from proxy.core.policy.model import ParamSource, match_segments
from proxy.core.policy.params import AMBIGUOUS, UNREADABLE, decode_capture, parse_query

PARAM_CEL_TYPES = {"string": cel.STRING, "integer": cel.INT, "number": cel.DOUBLE,
                   "boolean": cel.BOOL, "any": cel.DYN}

_WORKLOAD = cel.object_of("workload", {"spiffe_id": cel.STRING, "trust_domain": cel.STRING,
                                       "path": cel.STRING})
_TOKEN = cel.object_of("token", {
    "present": cel.BOOL, "iss": cel.STRING, "sub": cel.STRING, "client_id": cel.STRING,
    "scopes": cel.list_of(cel.STRING), "acr": cel.STRING, "amr": cel.list_of(cel.STRING),
    "auth_time": cel.INT, "claims": cel.map_of(cel.STRING, cel.DYN),
    "actors": cel.list_of(cel.STRING),
    "authorization_details": cel.list_of(cel.map_of(cel.STRING, cel.DYN)),
})


def rule_env(captures: tuple[str, ...], action_params: Mapping[str, cel.CelType]) -> cel.Env:
    """The variables of a rule's condition: its template `captures` (request.params) and the
    parameters its actions declare (action.params)."""
    request = cel.object_of("request", {
        "method": cel.STRING, "path": cel.STRING, "query": cel.map_of(cel.STRING, cel.STRING),
        "params": cel.map_of(cel.STRING, cel.STRING, keys={c: cel.STRING for c in captures},
                             name="request.params"),
    })
    action = cel.object_of("action", {
        "name": cel.STRING,
        "params": cel.map_of(cel.STRING, cel.DYN, keys=action_params, name="action.params"),
    })
    return {"request": request, "workload": _WORKLOAD, "token": _TOKEN, "action": action,
            "now": cel.TIMESTAMP}


@dataclass(frozen=True, slots=True)
class When:
    """A rule's compiled `when`. `sources`: the rule's templates (for request.params)."""

    condition: Condition
    sources: tuple[ParamSource, ...] = ()
    #: computed: memo keys, and per flat variable (name, value function) -- `resolve` with
    #: the dispatch done once at load
    key: str = field(default="", init=False)
    sources_key: str = field(default="", init=False)
    plans: tuple[tuple[str, Any], ...] = field(default=(), init=False, repr=False,
                                               compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", "w:" + repr((self.condition.source, self.sources)))
        object.__setattr__(self, "sources_key", "pc:" + repr(self.sources))
        object.__setattr__(self, "plans", tuple(
            (name, _plan(ref)) for name, ref in zip(self.condition.names, self.condition.refs)))

    @property
    def source(self) -> str:
        return self.condition.source

    def result(self, ctx: RequestContext, now: float | None,
               memo: dict[str, Any] | None = None) -> bool | str:
        """True, False, or an error message (never raises). `memo` (one per evaluation)
        shares results and parsed inputs between rules."""
        if memo is None:
            memo = {}
        got = memo.get(self.key)
        if got is None:
            act = {}
            try:
                for name, value in self.plans:
                    v = value(ctx, now, memo, self)
                    if v is not MISSING:
                        act[name] = v
            except Exception as exc:  # noqa: BLE001 - never raise from a decision
                got = f"{type(exc).__name__}: {exc}"
            else:
                got = self.condition.execute(act)
            memo[self.key] = got
        return got


# ------------------------------------------------------------------------------------------------
# Values of the variables
# ------------------------------------------------------------------------------------------------


def _plan(ref: Ref) -> Callable[[RequestContext, float | None, dict[str, Any], When], Any]:
    """`resolve` for one reference, specialised at load."""
    getters = _GETTERS.get(ref.root)
    steps = ref.steps
    if getters is None or not steps or (ref.has and len(steps) == 1) or \
            steps[0] not in getters:
        return lambda ctx, now, memo, w: resolve(ref, ctx, now, memo, w)
    get = getters[steps[0]]  # type: ignore[index]
    rest = steps[1:]
    if ref.has:
        parents, last = rest[:-1], rest[-1]

        def has_value(ctx: RequestContext, now: Any, memo: dict[str, Any], w: When) -> Any:
            v = get(ctx, memo, w)
            for s in parents:
                if v is MISSING:
                    return MISSING
                v = _step(v, s)
            t = type(v)
            if t is MappingProxyType or t is dict or isinstance(v, abc.Mapping):
                return last in v
            return MISSING
        return has_value
    if not rest:
        def field_value(ctx: RequestContext, now: Any, memo: dict[str, Any], w: When) -> Any:
            v = get(ctx, memo, w)
            return MISSING if v is MISSING else to_cel(v)
        return field_value
    if len(rest) == 1:
        key = rest[0]

        def key_value(ctx: RequestContext, now: Any, memo: dict[str, Any], w: When) -> Any:
            v = _step(get(ctx, memo, w), key)
            return MISSING if v is MISSING else to_cel(v)
        return key_value

    def path_value(ctx: RequestContext, now: Any, memo: dict[str, Any], w: When) -> Any:
        v = get(ctx, memo, w)
        for s in rest:
            if v is MISSING:
                return MISSING
            v = _step(v, s)
        return MISSING if v is MISSING else to_cel(v)
    return path_value


def resolve(ref: Ref, ctx: RequestContext, now: float | None, memo: dict[str, Any],
            when: When) -> Any:
    """The CEL value of one flat reference, or MISSING (the reference semantics; `_plan`
    specialises the common shapes)."""
    getters = _GETTERS.get(ref.root)
    steps = ref.steps
    if getters is None:  # `now`, the one variable that is not an object
        value = _now(now, memo) if ref.root == "now" else MISSING
        if steps or ref.has:
            return MISSING
        return value
    if not steps:
        value = {name: get(ctx, memo, when) for name, get in getters.items()}
        return to_cel({k: v for k, v in value.items() if v is not MISSING})
    if ref.has and len(steps) == 1:
        return steps[0] in getters  # an object's fields always exist
    get = getters.get(steps[0])  # type: ignore[call-overload]
    if get is None:
        return MISSING
    value = get(ctx, memo, when)
    last = len(steps) - 1 if ref.has else len(steps)
    for k in range(1, last):
        if value is MISSING:
            return MISSING
        value = _step(value, steps[k])
    if value is MISSING:
        return MISSING
    if ref.has:
        if isinstance(value, abc.Mapping):
            return steps[-1] in value
        return MISSING  # has() on a non-map is an error
    return to_cel(value)


def _step(value: Any, step: str | int) -> Any:
    t = type(value)
    if t is MappingProxyType or t is dict:
        return value.get(step, MISSING)
    if t is tuple or t is list:
        if type(step) is int and 0 <= step < len(value):
            return value[step]
        return MISSING
    if value is not MISSING and isinstance(value, abc.Mapping):
        return value.get(step, MISSING)
    return MISSING


def _now(now: float | None, memo: dict[str, Any]) -> Any:
    got = memo.get("now:")
    if got is None:
        if now is None or not math.isfinite(now):
            got = MISSING
        else:
            try:
                got = datetime.fromtimestamp(now, timezone.utc)
            except (OverflowError, OSError, ValueError):
                got = MISSING
        memo["now:"] = got
    return got


def _query_map(ctx: RequestContext, memo: dict[str, Any], _w: When) -> Any:
    got = memo.get("qm:")
    if got is None:
        q = memo.get("q:")
        if q is None:
            q = memo["q:"] = parse_query(ctx.query)
        if q is UNREADABLE or any(v is AMBIGUOUS for v in q.values()):
            got = MISSING
        else:
            got = MappingProxyType({name: value for name, value in q.values()})
        memo["qm:"] = got
    return got


def _captures(ctx: RequestContext, memo: dict[str, Any], w: When) -> Any:
    got = memo.get(w.sources_key)
    if got is None:
        got = MappingProxyType({})
        path = ctx.path
        if path[:1] == "/":
            segs = path.split("/")
            for src in w.sources:
                if src.methods is not None and ctx.method not in src.methods:
                    continue
                if match_segments(src.segments, segs, 1):
                    out = {}
                    for name, pos in src.captures:
                        v = decode_capture(segs[pos])
                        if v is not None:
                            out[name] = v
                    got = MappingProxyType(out)
                    break
        memo[w.sources_key] = got
    return got


def _tok(attr: str, default: Any) -> Callable[[RequestContext, Any, Any], Any]:
    def get(ctx: RequestContext, _m: Any, _w: Any) -> Any:
        tok = ctx.token
        if tok is None:
            return default
        v = getattr(tok, attr)
        return default if v is None else v
    return get


def _tok_scopes(ctx: RequestContext, _m: Any, _w: Any) -> Any:
    tok = ctx.token
    return sorted(tok.scopes) if tok is not None else ()


def _tok_actors(ctx: RequestContext, _m: Any, _w: Any) -> Any:
    tok = ctx.token
    return tuple(a.sub for a in tok.actors) if tok is not None else ()


def _action_params(ctx: RequestContext, _m: Any, _w: Any) -> Any:
    p = ctx.params
    t = type(p)
    return p if t is MappingProxyType or t is dict or isinstance(p, abc.Mapping) else MISSING


_EMPTY: Mapping[str, Any] = MappingProxyType({})

_GETTERS: dict[str, dict[str, Callable[[RequestContext, Any, Any], Any]]] = {
    "request": {
        "method": lambda c, m, w: c.method,
        "path": lambda c, m, w: c.path,
        "query": _query_map,
        "params": _captures,
    },
    "workload": {
        "spiffe_id": lambda c, m, w: str(c.workload),
        "trust_domain": lambda c, m, w: c.workload.trust_domain,
        "path": lambda c, m, w: c.workload.path,
    },
    "token": {
        "present": lambda c, m, w: c.token is not None,
        "iss": _tok("issuer", ""),
        "sub": _tok("subject", ""),
        "client_id": _tok("client_id", ""),
        "scopes": _tok_scopes,
        "acr": _tok("acr", ""),
        "amr": _tok("amr", ()),
        "auth_time": _tok("auth_time", 0),
        "claims": _tok("claims", _EMPTY),
        "actors": _tok_actors,
        "authorization_details": _tok("authorization_details", ()),
    },
    "action": {
        "name": lambda c, m, w: c.action if c.action is not None else "",
        "params": _action_params,
    },
}
