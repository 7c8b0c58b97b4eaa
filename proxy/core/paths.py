"""Request-target canonicalisation: authorise exactly what you forward (DESIGN section 3).

The policy decides on the canonical target this module returns, and the forwarder sends that same
canonical target upstream, so the two can never read a request differently. Anything that upstream
frameworks are known to interpret in more than one way is refused with 400 instead of guessed at.

The rule (RFC 9112 section 3.2, RFC 3986 sections 2, 3.3, 3.4, 5.2.4 and 6.2.2):

1. Only origin-form targets are accepted (they start with "/"). Asterisk-form (`*`), absolute-form
   (`http://x/a`), authority-form (`host:443`) and the empty target -> `invalid_target`.
   A `#` anywhere -> `invalid_target` (a fragment is never sent on the wire).
   The target is split at the first `?` into path and query.
2. Every path character must be an RFC 3986 `pchar` or "/": unreserved (ALPHA DIGIT - . _ ~),
   sub-delims (! $ & ' ( ) * + , ;  =), ":", "@" or a "%XX" escape. Anything else (space, backslash,
   `"<>^`{|}`, control characters, NUL, non-ASCII) -> `invalid_path`.
3. `;` anywhere in the path -> `invalid_path`: path parameters are read differently by upstream
   frameworks (Tomcat/Spring strip them, others do not).
4. `%` must be followed by two hex digits. Escapes of unreserved characters are decoded
   (RFC 3986 6.2.2.2: `/%61dmin` -> `/admin`, `%7e` -> `~`). Escapes of `/` (%2F), `\\` (%5C),
   `;` (%3B) and control octets (%00-%1F, %7F) -> `invalid_path`. Every other escape is kept, with
   uppercase hex (`%c3%a9` -> `%C3%A9`); reserved characters are never decoded (RFC 3986 2.2).
5. Dot segments `.` and `..` (also when spelled `%2E`) -> `invalid_path`. Conforming clients remove
   them before sending (RFC 3986 5.2.4; curl does unless --path-as-is), so one that arrives is an
   attack or a bug, and resolving it silently would hide the intent.
6. Repeated slashes are merged (`//admin` -> `/admin`, `///a//b` -> `/a/b`); the merged form is what
   is forwarded. A trailing slash is kept (`/a/` stays `/a/`).
7. The query is kept byte-for-byte, but must contain only printable ASCII other than `#`
   (no control characters, space, `#` or non-ASCII) -> else `invalid_target`. An empty query
   (`/a?`) is dropped: the canonical target is `/a`.

Input is the target as a `str` (the listener decodes the request line as latin-1, so every non-ASCII
byte is a non-ASCII character here). The result is idempotent:
canonical(canonical(x)) == canonical(x).

Speed: this runs on every request. A target that is already canonical (the common case) is
recognised by one regular expression per part and returned without building anything; only
targets with `%`, repeated slashes, a leading-dot segment, or an error take the slow path.
"""

from __future__ import annotations

import re

from proxy.core.model import Target
from proxy.errors import BadRequest

INVALID_TARGET = "invalid_target"
INVALID_PATH = "invalid_path"

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Fast path: one or more segments of pchar-without-%-and-; whose first character is not ".",
# optionally followed by a trailing slash; or just "/". Linear: every segment starts with "/".
_PCHAR_FAST = r"A-Za-z0-9\-._~!$&'()*+,=:@"
_CANONICAL_PATH = re.compile(rf"(?:/[{_PCHAR_FAST.replace(r'.', '')}][{_PCHAR_FAST}]*)*/?")
# Printable ASCII except "#" (0x23): 0x21-0x22, 0x24-0x7E.
_CANONICAL_QUERY = re.compile(r"[\x21\x22\x24-\x7e]*")
# Slow path: the first character that is neither pchar (with ";" handled separately), "/" nor "%".
_NOT_PATH_CHAR = re.compile(rf"[^{_PCHAR_FAST}/%;]")
_BAD_QUERY_CHAR = re.compile(r"[^\x21\x22\x24-\x7e]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")

# Octets whose escape is refused: "/", "\", ";" and the C0 controls and DEL.
_FORBIDDEN_OCTETS = frozenset([0x2F, 0x5C, 0x3B, 0x7F, *range(0x20)])


INVALID_HOST = "invalid_host"
# Host = uri-host [":" port] (RFC 9112 3.2, RFC 3986 3.2.2), narrowed to what names a service: a DNS
# name or IPv4 address (unreserved characters), or an IPv6 literal. No userinfo, path, list, space,
# percent-encoding or sub-delims: an upstream must never read a different authority from it.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")


def check_host(version: str, count: int, value: bytes) -> None:
    """RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host
    header, to any request with more than one, and to one whose Host is not a valid value.
    `count` is the number of Host field lines, `value` the (last) one; raises `BadRequest`."""
    if version == "1.1" and count != 1:
        raise BadRequest(INVALID_HOST, "HTTP/1.1 request needs exactly one Host header")
    if count > 1:
        raise BadRequest(INVALID_HOST, "more than one Host header")
    if count and _HOST.fullmatch(value.rstrip(b" \t")) is None:  # llhttp keeps trailing OWS
        raise BadRequest(INVALID_HOST, "Host is not host[:port]")


def canonicalize_target(raw: str) -> Target:
    """Canonicalise an origin-form request target, or raise `BadRequest` (`invalid_target` /
    `invalid_path`). See the module docstring for the rule."""
    q = raw.find("?")
    if q < 0:
        path, query = raw, ""
    else:
        path, query = raw[:q], raw[q + 1:]
    if (
        path[:1] == "/"
        and _CANONICAL_PATH.fullmatch(path) is not None
        and (not query or _CANONICAL_QUERY.fullmatch(query) is not None)
    ):
        return Target(path, query)
    return _canonicalize_target_slow(raw)


def canonicalize_path(path: str) -> str:
    """Canonicalise a path without a query (same rules 2-6); raise `BadRequest(invalid_path)`.
    The policy compiler uses it to check that route literals are canonical."""
    if path[:1] == "/" and _CANONICAL_PATH.fullmatch(path) is not None:
        return path
    return _canonicalize_path_slow(path)


# ------------------------------------------------------------------------------------------------
# Slow path: full checks, with the reason in `detail` (audit log only, never sent to the client).
# ------------------------------------------------------------------------------------------------


def _canonicalize_target_slow(raw: str) -> Target:
    if not raw:
        raise BadRequest(INVALID_TARGET, "empty request target")
    if raw == "*":
        raise BadRequest(INVALID_TARGET, "asterisk-form request target is not accepted")
    if raw[0] != "/":
        raise BadRequest(INVALID_TARGET, "only origin-form request targets (starting with '/') "
                                         "are accepted")
    if "#" in raw:
        raise BadRequest(INVALID_TARGET, "request target contains '#'")
    q = raw.find("?")
    path, query = (raw, "") if q < 0 else (raw[:q], raw[q + 1:])
    bad = _BAD_QUERY_CHAR.search(query)
    if bad is not None:
        raise BadRequest(INVALID_TARGET,
                         f"query contains a forbidden character {bad.group()!r} at {bad.start()}")
    return Target(_canonicalize_path_slow(path), query)


def _canonicalize_path_slow(path: str) -> str:
    if path[:1] != "/":
        raise BadRequest(INVALID_PATH, "path must start with '/'")
    bad = _NOT_PATH_CHAR.search(path)
    if bad is not None:
        raise BadRequest(INVALID_PATH,
                         f"path contains a forbidden character {bad.group()!r} at {bad.start()}")
    if ";" in path:
        raise BadRequest(INVALID_PATH, "path contains ';' (path parameters are ambiguous)")
    if "%" in path:
        bad = _BAD_ESCAPE.search(path)
        if bad is not None:
            raise BadRequest(INVALID_PATH, f"'%' not followed by two hex digits at {bad.start()}")
        path = _ESCAPE.sub(_normalize_escape, path)
    out = []
    for seg in path.split("/"):
        if not seg:
            continue  # the leading "", and repeated slashes (rule 6)
        if seg == "." or seg == "..":
            raise BadRequest(INVALID_PATH, "path contains a dot segment")
        out.append(seg)
    if not out:
        return "/"
    canonical = "/" + "/".join(out)
    return canonical + "/" if path.endswith("/") else canonical


def _normalize_escape(m: re.Match[str]) -> str:
    hexdigits = m.group(1)
    octet = int(hexdigits, 16)
    ch = chr(octet)
    if ch in _UNRESERVED:
        return ch
    if octet in _FORBIDDEN_OCTETS:
        raise BadRequest(INVALID_PATH, f"path contains a forbidden escape %{hexdigits.upper()}")
    return "%" + hexdigits.upper()
