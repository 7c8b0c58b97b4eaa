"""SPIFFE IDs and X.509-SVIDs.

Implements:
- SPIFFE ID parsing exactly per the SPIFFE ID specification (SPIFFE-ID.md sections 2.1-2.3):
  scheme `spiffe://` in lowercase; trust domain of lowercase letters, digits, `.`, `-`, `_`, at most
  255 characters; path segments of letters, digits, `.`, `-`, `_`; no empty, `.` or `..` segments;
  no trailing slash; no percent-encoding, query, fragment, port or userinfo; at most 2048 bytes.
"""

from __future__ import annotations

from proxy.core.model import SpiffeId
from proxy.errors import InvalidValue

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_CHARS = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def parse_trust_domain(name: str) -> str:
    """Validate a bare trust domain name (`example.org`) and return it."""
    if not name:
        raise InvalidValue("trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_CHARS:
        raise InvalidValue("trust domain is longer than 255 characters")
    bad = set(name) - _TD_CHARS
    if bad:
        raise InvalidValue("trust domain has characters other than a-z 0-9 . - _", name)
    return name


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse a SPIFFE ID; raise `InvalidValue` naming the first rule it breaks."""
    if not isinstance(value, str):
        raise InvalidValue("SPIFFE ID must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidValue("SPIFFE ID is longer than 2048 bytes")
    if not value.startswith(SCHEME):
        raise InvalidValue("SPIFFE ID must start with spiffe://", value)
    rest = value[len(SCHEME):]
    slash = rest.find("/")
    td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if not td:
        raise InvalidValue("SPIFFE ID has no trust domain", value)
    if "@" in td:
        raise InvalidValue("SPIFFE ID must not have userinfo", value)
    if ":" in td:
        raise InvalidValue("SPIFFE ID must not have a port", value)
    for ch, what in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
        if ch in rest:
            raise InvalidValue(f"SPIFFE ID must not have a {what}", value)
    try:
        parse_trust_domain(td)
    except InvalidValue as exc:
        raise InvalidValue(exc.reason, value) from None
    if path:
        for seg in path[1:].split("/"):
            if seg == "":
                raise InvalidValue("SPIFFE ID path has an empty segment or a trailing slash", value)
            if seg in (".", ".."):
                raise InvalidValue("SPIFFE ID path has a dot segment", value)
            if not _PATH_CHARS.issuperset(seg):
                raise InvalidValue("SPIFFE ID path has characters other than a-z A-Z 0-9 . - _",
                                   value)
    return SpiffeId(td, path)
