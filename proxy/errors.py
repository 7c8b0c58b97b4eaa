"""The one error tree of Portcullis.

Rules (DESIGN.md section 1, rules 3 and 4; section 4):
- Every request-time failure is a `ProxyError`. Each class declares its HTTP `status`, a default
  stable `code`, and (for 401) the scheme of its `WWW-Authenticate` challenge. An instance may carry
  a more specific stable `code` (for example `svid_expired`), the deciding `rule_id`, and a `detail`
  string that goes to the audit log and the operator log only: it is never rendered to the client.
- `proxy.runtime.responses` is the single place that turns a `ProxyError` into an HTTP response.
- Load-time failures (configuration, policy, bundles, key material) are `ConfigError`, which carries
  every problem found with the key path it belongs to (`listener.port: must be 1..65535`).
- Parsers of untrusted values used both at load time and at request time (SPIFFE IDs) raise
  `InvalidValue`, a `ValueError`; request-time callers translate it into the matching `ProxyError`.

Codes are part of the public interface (audit records, metrics labels, response bodies): never
rename one, only add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable


class PortcullisError(Exception):
    """Root of everything Portcullis raises on purpose."""


class InvalidValue(PortcullisError, ValueError):
    """An untrusted value failed a syntax rule. `reason` is a short stable phrase."""

    def __init__(self, reason: str, value: str | None = None) -> None:
        super().__init__(reason if value is None else f"{reason}: {value!r}")
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Load time
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input, at a key path (`rules[3].to[0].path`, `listener.port`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(PortcullisError):
    """Configuration, policy or key material that cannot be loaded. Lists every problem found."""

    def __init__(self, problems: Iterable[Problem] | str, source: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(p) for p in self.problems))

    def render(self) -> str:
        """One problem per line, prefixed by the source file when known."""
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + str(p) for p in self.problems)


class BundleError(PortcullisError):
    """A policy bundle that cannot be read, trusted or installed (`proxy.core.bundle`,
    `proxy.bundles`). `code` is stable (`bundle_unsigned`, `bundle_rollback`...; the full list is in
    `proxy.core.bundle.CODES`); `detail` is for the operator log and the CLI."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


# --------------------------------------------------------------------------------------------
# Request time
# --------------------------------------------------------------------------------------------


class ProxyError(PortcullisError):
    """A request-time failure that becomes exactly one HTTP response and one audit record."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    #: Decision recorded in the audit log for this error: "deny" (a check said no) or "error"
    #: (the sidecar could not decide or could not deliver).
    decision: ClassVar[str] = "error"
    #: `WWW-Authenticate` scheme for 401s ("Bearer" / "DPoP"); None for other statuses.
    challenge_scheme: ClassVar[str | None] = None

    def __init__(
        self,
        code: str | None = None,
        detail: str = "",
        *,
        rule_id: str | None = None,
        challenge_params: tuple[tuple[str, str], ...] = (),
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.code = code or self.default_code
        self.detail = detail
        self.rule_id = rule_id
        self.challenge_params = challenge_params
        self.extra_headers = headers
        super().__init__(f"{self.code}: {detail}" if detail else self.code)

    def challenge(self) -> str | None:
        """The `WWW-Authenticate` value (RFC 9110 section 11.6.1), or None."""
        if self.challenge_scheme is None:
            return None
        if not self.challenge_params:
            return self.challenge_scheme
        params = ", ".join(f'{k}="{v}"' for k, v in self.challenge_params)
        return f"{self.challenge_scheme} {params}"


class BadRequest(ProxyError):
    status = 400
    default_code = "bad_request"
    decision = "deny"


class InvalidInput(BadRequest):
    """400 listing every problem of a request body (`problems`: [{file?, path, message}]); the
    control plane's API adds them to the error body."""

    def __init__(self, code: str, problems: list[dict[str, str]], detail: str = "") -> None:
        super().__init__(code, detail or f"{len(problems)} problem(s)")
        self.problems = problems


class NotFound(ProxyError):
    status = 404
    default_code = "not_found"
    decision = "deny"


class RequestTimeout(ProxyError):
    status = 408
    default_code = "request_timeout"
    decision = "deny"


class PayloadTooLarge(ProxyError):
    status = 413
    default_code = "payload_too_large"
    decision = "deny"


class URITooLong(ProxyError):
    """RFC 9112 section 3: a request-target longer than the server wishes to parse (414)."""

    status = 414
    default_code = "uri_too_long"
    decision = "deny"


class HeadersTooLarge(ProxyError):
    status = 431
    default_code = "headers_too_large"
    decision = "deny"


class MethodNotAllowed(ProxyError):
    status = 405
    default_code = "method_not_allowed"
    decision = "deny"


class PeerIdentityError(ProxyError):
    """The TLS peer did not present a valid X.509-SVID for a trusted domain (403)."""

    status = 403
    default_code = "peer_identity_invalid"
    decision = "deny"


class TokenError(ProxyError):
    """A missing or invalid access token (RFC 6750 section 3.1): 401 with a Bearer challenge.

    `code` is our stable reason (`token_expired`, `token_bad_signature`...); the challenge carries the
    RFC error (`invalid_token`, or `invalid_request` for a malformed request) — never the token.
    The pipeline sets `challenge_scheme` to "DPoP" on routes that require DPoP-bound tokens.
    """

    status = 401
    default_code = "token_invalid"
    decision = "deny"
    challenge_scheme = "Bearer"

    def __init__(self, code: str | None = None, detail: str = "", *, rfc_error: str = "invalid_token",
                 scheme: str | None = None, algs: str | None = None, **kw) -> None:
        params = list(kw.pop("challenge_params", ()))
        if not params:
            if rfc_error:
                params.append(("error", rfc_error))
            if algs:
                params.append(("algs", algs))
        super().__init__(code, detail, challenge_params=tuple(params), **kw)
        self.rfc_error = rfc_error
        self.issuer: str | None = None  # set when the failure is about one issuer's keys
        if scheme is not None:
            self.challenge_scheme = scheme  # type: ignore[misc]


class DPoPError(TokenError):
    """An invalid DPoP proof (RFC 9449 section 7.1): 401, `DPoP error="invalid_dpop_proof"`,
    with `algs=` listing the accepted algorithms."""

    default_code = "dpop_invalid"
    challenge_scheme = "DPoP"

    def __init__(self, code: str | None = None, detail: str = "", *, algs: str | None = None,
                 rfc_error: str = "invalid_dpop_proof", **kw) -> None:
        super().__init__(code, detail, rfc_error=rfc_error, scheme="DPoP", algs=algs, **kw)


class DPoPNonceRequired(DPoPError):
    """RFC 9449 section 9: the proof must carry the server nonce given in `DPoP-Nonce`."""

    default_code = "dpop_nonce_required"

    def __init__(self, nonce: str, detail: str = "", *, algs: str | None = None, **kw) -> None:
        headers = tuple(kw.pop("headers", ())) + (("DPoP-Nonce", nonce),)
        super().__init__("dpop_nonce_required", detail, algs=algs, rfc_error="use_dpop_nonce",
                         headers=headers, **kw)


class InsufficientAuthentication(ProxyError):
    """RFC 9470 step-up: the token's authentication is too weak or too old. 401 with
    `error="insufficient_user_authentication"` and `acr_values` / `max_age`."""

    status = 401
    default_code = "insufficient_user_authentication"
    decision = "deny"
    challenge_scheme = "Bearer"

    def __init__(self, code: str | None = None, detail: str = "", *, acr_values: str | None = None,
                 max_age: int | None = None, scheme: str = "Bearer", **kw) -> None:
        params = [("error", "insufficient_user_authentication")]
        if acr_values:
            params.append(("acr_values", acr_values))
        if max_age is not None:
            params.append(("max_age", str(max_age)))
        super().__init__(code, detail, challenge_params=tuple(params), **kw)
        self.challenge_scheme = scheme  # type: ignore[misc]


class InsufficientScope(ProxyError):
    """RFC 6750 section 3.1 `insufficient_scope`: 403 with the scopes needed."""

    status = 403
    default_code = "insufficient_scope"
    decision = "deny"
    challenge_scheme = "Bearer"

    def __init__(self, code: str | None = None, detail: str = "", *, scope: str | None = None,
                 **kw) -> None:
        params = [("error", "insufficient_scope")] + ([("scope", scope)] if scope else [])
        super().__init__(code, detail, challenge_params=tuple(params), **kw)


class Denied(ProxyError):
    """The policy said no (403). `rule_id` names the deny rule, None when nothing matched."""

    status = 403
    default_code = "denied"
    decision = "deny"


class ServiceUnavailable(ProxyError):
    """The sidecar cannot decide safely right now (stale inputs, draining, audit full)."""

    status = 503
    default_code = "unavailable"

    def __init__(self, code: str | None = None, detail: str = "", *, retry_after_s: int = 5,
                 **kw) -> None:
        headers = tuple(kw.pop("headers", ())) + (("Retry-After", str(retry_after_s)),)
        super().__init__(code, detail, headers=headers, **kw)


class PolicyUnavailable(ServiceUnavailable):
    default_code = "policy_unavailable"


class ReplayStoreFull(ServiceUnavailable):
    """The replay/single-use store is full of live records (`core.replay`). A value that cannot be
    recorded is never accepted: the request fails closed with 503 instead."""

    default_code = "replay_store_full"


class DPoPReplayStoreFull(ReplayStoreFull):
    """RFC 9449 section 11.1: a DPoP proof whose `jti` could not be recorded is refused (503)."""

    default_code = "dpop_replay_store_full"


class UpstreamError(ProxyError):
    status = 502
    default_code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    default_code = "upstream_timeout"


class InternalError(ProxyError):
    """A bug. Rendered as 500 without detail; the detail is logged on stderr."""

    status = 500
    default_code = "internal_error"
