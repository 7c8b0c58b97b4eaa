"""Actions: named operations with typed parameters, mapped from REST routes (policy `actions:`).

    actions:
      - name: invoice.approve                 # [A-Za-z0-9_][A-Za-z0-9._:-]{0,127}, unique
        description: "..."                    # optional
        methods: [POST]                       # optional (omitted = any), as in routes
        paths: ["/api/invoices/{invoice_id}/approve"]   # required, path templates as in routes
        max_body_bytes: 65536                 # optional, 1..16777216; default 65536
        max_json_depth: 32                    # optional, 1..64; default 32 (arrays/objects)
        params:                               # optional mapping: parameter name -> source
          invoice_id: {from: path}                        # a template capture (`name:` another)
          amount: {from: body, pointer: /amount, type: number}   # RFC 6901 JSON pointer
          department: {from: query, type: string}         # a query parameter (`name:` another)
          note: {from: body, pointer: /note, required: false}

The runtime calls, per request (all pure):
- `CompiledPolicy.action_for(method, path) -> ActionSpec | None`: the first action in file order
  whose route matches (indexed like `authentication_for`);
- when the spec `needs_body`, it reads at most `spec.max_body_bytes` of the body (a larger body is
  refused with 413 before reading it: `PayloadTooLarge("body_too_large")`);
- `extract_params(spec, spec.captures(path), query, body, content_type=...)` -> a read-only
  mapping name -> value, or a `BadRequest` (400) with a stable code:
    `missing_param`      a required parameter is absent (capture, query name, pointer target,
                         or the whole body is empty);
    `param_type`         a value of the wrong type or form (see coercion below), or a capture
                         that is not valid percent-encoded UTF-8;
    `ambiguous_param`    the query names the parameter twice, or under a spelling that lenient
                         frameworks read as the same name (`params.same_name`), or the query
                         cannot be decoded: upstream might read another value than we did;
    `invalid_json_body`  not UTF-8, not JSON (RFC 8259: no NaN/Infinity, no BOM), a duplicate
                         object member name anywhere (parsers disagree on which one wins);
    `json_too_deep`      arrays/objects nested deeper than the action's `max_json_depth`
                         (default `MAX_JSON_DEPTH`, 32; at most `MAX_JSON_DEPTH_LIMIT`, 64);
    `unsupported_content_type`  with `content_type` given: not application/json or
                         application/*+json (or a charset other than utf-8);
  and `PayloadTooLarge("body_too_large")` (413) when `len(body) > spec.max_body_bytes`.
- the pipeline puts `spec.name` and the mapping into `RequestContext.action` / `.params`.

Type coercion (`type:`; default `string` for path and query, `any` for body):
- `string`: path captures percent-decoded as UTF-8; query values form-decoded (`params`); a body
  value must be a JSON string (a number is never turned into a string, nor the reverse).
- `integer`: text `-?[0-9]+`; JSON: an integer literal (not `4800.0`, not a bool); within int64.
  Python `int`, CEL `int`.
- `number`: text: a plain decimal `-?[0-9]+(.[0-9]+)?`; JSON: any number (not a bool, not a
  string). Python: always `decimal.Decimal`, exact (no float ever reads the request: `0.1`
  stays 0.1, money compares exactly in `require.authorization_details` bounds). CEL sees a
  `double`; a number that no double represents exactly (more than ~15-17 significant digits)
  is refused with `param_type`, so comparing it in CEL with any integer or double constant is
  exact too.
- `boolean`: text `true` / `false`; JSON `true` / `false`.
- `any` (body only): the JSON value as parsed (objects as read-only mappings, arrays as tuples,
  numbers as int or Decimal); CEL type dyn.
An optional parameter (`required: false`) that is absent is left out of the mapping (CEL:
`has(action.params.x)`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, Literal, Mapping

from proxy.core.policy.model import Route
from proxy.core.policy.params import AMBIGUOUS, decode_capture, parse_query, query_param
from proxy.errors import BadRequest, PayloadTooLarge

DEFAULT_MAX_BODY_BYTES = 65536
MAX_BODY_BYTES_LIMIT = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_JSON_DEPTH_LIMIT = 64

ParamSourceKind = Literal["path", "query", "body"]
ParamType = Literal["string", "integer", "number", "boolean", "any"]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One action parameter: read from `source` under `key` (capture name, query name, or the
    pointer text for body), `pointer` the decoded RFC 6901 reference tokens (body)."""

    name: str
    source: ParamSourceKind
    key: str
    type: ParamType
    required: bool = True
    pointer: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """A compiled action. `index` is its position in `actions` (first match in file order)."""

    name: str
    index: int
    route: Route
    params: tuple[ParamSpec, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    description: str = ""
    max_json_depth: int = MAX_JSON_DEPTH
    #: computed: does any parameter come from the body? (only then is the body read)
    needs_body: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_body", any(p.source == "body" for p in self.params))

    def captures(self, path: str) -> dict[str, str]:
        """Capture name -> raw (still percent-encoded) segment of the first template of this
        action that matches the canonical `path`; {} when none does."""
        if path[:1] != "/":
            return {}
        segs = path.split("/")
        for t in self.route.paths:
            if t.matches(path):
                return {seg[1:-1]: segs[k + 1] for k, seg in enumerate(t.segments)
                        if seg[:1] == "{"}
        return {}


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------

_EMPTY_DOC = object()
_ABSENT = object()
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_WS = b" \t\r\n"


def extract_params(spec: ActionSpec, path_captures: Mapping[str, str], query: str,
                   body: bytes | None, *, content_type: str | None = None) -> Mapping[str, Any]:
    """The parameters of `spec` for one request (see the module docstring for the codes).
    `path_captures`: `spec.captures(path)`; `query`: the raw query (no "?"); `body`: the whole
    body when `spec.needs_body` (None or b"" when there is none); `content_type`: the request's
    Content-Type when known (checked only when a body is parsed)."""
    out: dict[str, Any] = {}
    parsed_query: Mapping[str, Any] | None = None
    doc: Any = None
    for p in spec.params:
        if p.source == "path":
            raw = path_captures.get(p.key)
            if raw is None:
                value: Any = _ABSENT
            else:
                value = decode_capture(raw)
                if value is None:
                    raise BadRequest("param_type", f"parameter {p.name}: the path segment is not "
                                                   "valid percent-encoded UTF-8")
            if value is not _ABSENT:
                value = _from_text(p, value)
        elif p.source == "query":
            if parsed_query is None:
                parsed_query = parse_query(query)
            v = query_param(parsed_query, p.key)
            if v is AMBIGUOUS:
                raise BadRequest("ambiguous_param", f"parameter {p.name}: query name {p.key!r} is "
                                                    "given twice, under another spelling, or the "
                                                    "query cannot be decoded")
            value = _ABSENT if v is None else _from_text(p, v)
        else:
            if doc is None:
                doc = _parse_body(spec, body, content_type)
            value = _ABSENT if doc is _EMPTY_DOC else _pointer(doc, p.pointer)
            if value is not _ABSENT:
                value = _from_json(p, value)
        if value is _ABSENT:
            if p.required:
                raise BadRequest("missing_param", f"parameter {p.name} ({p.source} "
                                                  f"{p.key or '/'}) is required")
            continue
        out[p.name] = value
    return MappingProxyType(out)


def _bad_type(p: ParamSpec, what: str) -> BadRequest:
    return BadRequest("param_type", f"parameter {p.name} must be {what}")


def _from_text(p: ParamSpec, text: str) -> Any:
    t = p.type
    if t == "string" or t == "any":
        return text
    if t == "integer":
        if not _INTEGER.fullmatch(text):
            raise _bad_type(p, "an integer (-?[0-9]+)")
        return _int64(p, int(text))
    if t == "number":
        if len(text) > 64 or not _DECIMAL.fullmatch(text):
            raise _bad_type(p, "a plain decimal number (-?[0-9]+(.[0-9]+)?)")
        return _exact(p, Decimal(text))
    if text == "true":
        return True
    if text == "false":
        return False
    raise _bad_type(p, "true or false")


def _from_json(p: ParamSpec, value: Any) -> Any:
    t = p.type
    vt = type(value)
    if t == "any":
        return value
    if t == "string":
        if vt is not str:
            raise _bad_type(p, "a JSON string")
        return value
    if t == "integer":
        if vt is not int:
            raise _bad_type(p, "a JSON integer")
        return _int64(p, value)
    if t == "number":
        if vt is int:
            return _exact(p, Decimal(value))
        if vt is Decimal:
            return _exact(p, value)
        raise _bad_type(p, "a JSON number")
    if vt is not bool:
        raise _bad_type(p, "true or false")
    return value


def _int64(p: ParamSpec, v: int) -> int:
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise _bad_type(p, "an integer within int64")
    return v


def _exact(p: ParamSpec, d: Decimal) -> Decimal:
    """A number that a double represents exactly enough: its shortest double spelling reads
    back as the same decimal (so CEL comparisons with it are exact)."""
    try:
        f = float(d)
        ok = f not in (float("inf"), float("-inf")) and Decimal(repr(f)) == d
    except (InvalidOperation, OverflowError, ValueError):
        ok = False
    if not ok:
        raise _bad_type(p, "a number with at most 15 significant digits (exact as a double)")
    return d


def _parse_body(spec: ActionSpec, body: bytes | None, content_type: str | None) -> Any:
    if body is not None and len(body) > spec.max_body_bytes:
        raise PayloadTooLarge("body_too_large",
                              f"action {spec.name} reads at most {spec.max_body_bytes} bytes")
    if not body or not body.strip(_JSON_WS):
        return _EMPTY_DOC
    if content_type is not None and not is_json_media_type(content_type):
        raise BadRequest("unsupported_content_type",
                         f"action {spec.name} reads a JSON body; Content-Type is "
                         f"{content_type[:80]!r}")
    if not json_depth_ok(body, spec.max_json_depth):
        raise BadRequest("json_too_deep", f"action {spec.name} reads JSON nested at most "
                                          f"{spec.max_json_depth} deep")
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except _Duplicate as exc:
        raise BadRequest("invalid_json_body", f"duplicate member name {exc.args[0]!r:.80}") \
            from None
    except RecursionError:
        raise BadRequest("json_too_deep", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("invalid_json_body", f"not JSON: {str(exc)[:120]}") from None


class _Duplicate(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> Mapping[str, Any]:
    d = {k: (_freeze(v) if type(v) is list else v) for k, v in pairs}
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return MappingProxyType(d)


_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constant,
                            object_pairs_hook=_object)


def is_json_media_type(content_type: str) -> bool:
    """application/json or application/<x>+json, optionally with charset=utf-8 (RFC 8259 8.1)."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and
                                            media.endswith("+json")):
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            return False
    return True


def json_depth_ok(body: bytes, limit: int) -> bool:
    """Is no array/object of this (JSON) text nested deeper than `limit`? Brackets inside
    strings do not count. Linear; a Python loop only when there are more than `limit` openers."""
    text = _JSON_STRING.sub(b"", body) if b'"' in body else body
    if text.count(b"[") + text.count(b"{") <= limit:
        return True
    depth = 0
    for c in text:
        if c == 91 or c == 123:  # [ {
            depth += 1
            if depth > limit:
                return False
        elif c == 93 or c == 125:  # ] }
            depth -= 1
    return True


def _pointer(doc: Any, tokens: tuple[str, ...]) -> Any:
    """RFC 6901 evaluation; `_ABSENT` when a member or index does not exist."""
    node = doc
    for tok in tokens:
        t = type(node)
        if t is MappingProxyType:
            node = node.get(tok, _ABSENT)
        elif t is list or t is tuple:
            if not tok.isdigit() or not tok.isascii() or (len(tok) > 1 and tok[0] == "0"):
                return _ABSENT  # "-" (past the end) and non-indexes point at nothing
            k = int(tok)
            node = node[k] if k < len(node) else _ABSENT
        else:
            return _ABSENT
        if node is _ABSENT:
            return _ABSENT
    return _freeze(node)


def _freeze(v: Any) -> Any:
    if type(v) is list:
        return tuple(_freeze(x) for x in v)
    return v


def parse_pointer(text: str) -> tuple[str, ...] | None:
    """RFC 6901 reference tokens of a JSON pointer, None when it is malformed ("" is the whole
    document; every token after "/" with `~0` -> `~` and `~1` -> `/`)."""
    if text == "":
        return ()
    if text[0] != "/" or re.search(r"~(?![01])", text):
        return None
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in text[1:].split("/"))
