"""Request parameters and numbers for `require.authorization_details` (RFC 9396) checks.

Pure helpers, used by `model.DetailsRequirement` at request time. Nothing here raises: a value
that cannot be read is `None` (or `UNREADABLE` / `AMBIGUOUS`), and the caller treats it as "no
match" (fail closed).

Request parameters come from two places:
- path template captures (`{invoice_id}`): the segment of the canonical path
  (`core.paths.canonicalize_path`), percent-decoded as UTF-8 (`+` stays a plus sign);
- the query string (`RequestContext.query`), read with HTML form decoding (WHATWG URL,
  application/x-www-form-urlencoded parsing, as most upstream frameworks read it): split on `&`,
  empty parts skipped, each part split at its first `=` (no `=`: empty value), `+` is a space,
  `%XX` escapes decoded as UTF-8.

Fail-closed rules (an upstream framework must never read a parameter differently than we did):
- a name given twice in the query (even with equal values), or given both as a capture and in the
  query, is `AMBIGUOUS`: no requirement that reads it can hold. "The same name" is judged the way
  lenient frameworks judge it (`same_name`): case-insensitively, ignoring surrounding spaces, with
  PHP's `.`/space -> `_` and everything from the first `[` dropped (`amount[]`), so `Amount=9`,
  `amount+=9` or `amount[]=9` next to `amount=1` make `amount` ambiguous; a parameter is only read
  from a query name spelled exactly like the rule's name;
- a query with a malformed escape (`%` not followed by two hex digits) or invalid UTF-8 anywhere is
  `UNREADABLE` as a whole (a broken name could hide a duplicate): every lookup fails;
- `;` is not a separator (`a=1;a=2` is the single value "1;a=2", which is not a number and equals
  no plain identifier).

Numbers (`bounds`): a request parameter must be a plain decimal in ASCII: `-?[0-9]+(.[0-9]+)?`
(no exponent, no `+`, no spaces, no `_`, no `Infinity`/`NaN`); an authorization_details field
must be a JSON integer, a finite JSON number, or a string of that same decimal form. Comparisons
are exact (`int`, or `decimal.Decimal` when there is a fraction; Python compares the two exactly):
a float field is read as its shortest repr, so the JSON number `4800.10` compares equal to the
parameter `4800.1`.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Mapping

AMBIGUOUS = object()
UNREADABLE: Mapping[str, Any] = MappingProxyType({})  # a sentinel: compare with `is`
_BIG = 10 ** 64

#: exact numbers: `int` when integral (cheap to compare), else `Decimal`; the two compare exactly
Number = int | Decimal

_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _unescape(s: str) -> str | None:
    """Percent-decode `s` (UTF-8); None when an escape is malformed or the bytes are not UTF-8."""
    if "%" not in s:
        return s
    if _BAD_ESCAPE.search(s):
        return None
    try:
        return _ESCAPE.sub(lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8"),
                           s)
    except UnicodeDecodeError:
        return None


def form_decode(s: str) -> str | None:
    """application/x-www-form-urlencoded decoding of one name or value (None when malformed)."""
    return _unescape(s.replace("+", " ") if "+" in s else s)


def decode_capture(segment: str) -> str | None:
    """A path capture: percent-decoded as UTF-8 (`+` is a plus in a path); None when malformed."""
    return _unescape(segment)


def same_name(name: str) -> str:
    """The key under which lenient upstream frameworks may read `name` (see module docstring)."""
    if name.isascii() and name.islower() and name.isidentifier():
        return name  # the common case: nothing to fold
    return name.split("[", 1)[0].strip().casefold().replace(" ", "_").replace(".", "_")


def parse_query(query: str) -> Mapping[str, Any]:
    """`same_name(name)` -> (name, decoded value), or `AMBIGUOUS` when several parts share that
    key; `UNREADABLE` (the object itself, compare with `is`) when any part cannot be decoded."""
    out: dict[str, Any] = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        n = name if "%" not in name and "+" not in name else form_decode(name)
        v = value if "%" not in value and "+" not in value else form_decode(value)
        if n is None or v is None:
            return UNREADABLE
        key = same_name(n)
        out[key] = AMBIGUOUS if key in out else (n, v)
    return out


def query_param(query: Mapping[str, Any], name: str, key: str | None = None) -> Any:
    """The value of `name` in a `parse_query` result: a str, None when absent, `AMBIGUOUS` when
    given twice, under another spelling, or when the query is unreadable. `key` is
    `same_name(name)` when the caller has it already."""
    if query is UNREADABLE:
        return AMBIGUOUS
    entry = query.get(same_name(name) if key is None else key)
    if entry is None:
        return None
    if entry is AMBIGUOUS or entry[0] != name:
        return AMBIGUOUS
    return entry[1]


def param_decimal(value: str) -> Number | None:
    """A request parameter as an exact number (an `int` when it has no fraction, else a
    `Decimal`), or None when it is not a plain decimal."""
    if len(value) > 64:
        return None
    if value.isdigit() and value.isascii():  # the common case, without the regex
        return int(value)
    if not _DECIMAL.fullmatch(value):
        return None
    return int(value) if "." not in value else Decimal(value)


def field_decimal(value: Any) -> Number | None:
    """An authorization_details field as an exact number, or None (bool, null, objects, arrays,
    non-finite floats and strings that are not plain decimals never compare)."""
    t = type(value)
    if t is int:
        return value  # type: ignore[no-any-return]
    if t is float:
        return Decimal(repr(value)) if math.isfinite(value) else None
    if t is str:
        return param_decimal(value)
    return None


def field_text(value: Any) -> str | None:
    """An authorization_details field compared with a parameter "as strings": a string as is, an
    integer in decimal; anything else (bool, float, null, objects, arrays) never equals."""
    t = type(value)
    if t is str:
        return value
    if t is int:
        return str(value) if -_BIG < value < _BIG else None
    return None
