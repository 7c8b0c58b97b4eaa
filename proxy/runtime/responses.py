"""The single mapping from `ProxyError` to an HTTP/1.1 response (DESIGN rule 4, section 4).

Rules:
- Status, code and `WWW-Authenticate` challenge come from the error class/instance; nothing else
  in the code base writes an error response.
- The body is small JSON: `{"error": <stable code>, "decision_id": <id>}` (no `decision_id` for
  the admin listener's refusals, which decide nothing). `detail` (internals,
  reasons) never reaches the client; it goes to the audit record and stderr.
- Responses are never cached (`cache-control: no-store`); `connection: close` when the connection
  will be closed after this response.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson

from proxy.errors import ProxyError

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def render_error(err: ProxyError, *, decision_id: str | None, close: bool,
                 head_only: bool = False) -> bytes:
    """`decision_id` None: an answer that is no decision (the admin listener's)."""
    body = orjson.dumps({"error": err.code} if decision_id is None
                        else {"error": err.code, "decision_id": decision_id})
    extra = list(err.extra_headers)
    challenge = err.challenge()
    if challenge is not None:
        extra.insert(0, ("www-authenticate", challenge))
    return render(err.status, "application/json", body, close=close, head_only=head_only,
                  extra=extra)


def render(status: int, content_type: str, body: bytes, *, close: bool, head_only: bool = False,
           extra: "list[tuple[str, str]] | tuple[tuple[str, str], ...]" = ()) -> bytes:
    """A whole response the sidecar writes itself (an error above, or the admin listener's
    answers): never cached, `connection: close` when the connection closes after it."""
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}", f"content-type: {content_type}",
             f"content-length: {len(body)}", "cache-control: no-store"]
    lines += [f"{name}: {value}" for name, value in extra]
    if close:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
