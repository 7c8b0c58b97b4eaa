"""Shared vocabulary of the decision core: plain frozen values, no behaviour that does I/O.

Rules:
- Everything here is immutable so a value can be shared between a request and the audit record,
  and a snapshot can never change under a request: frozen dataclasses with slots, except the
  values built on every request (`Target`, `RequestContext`, `Decision`), which are NamedTuples —
  just as immutable, and three times cheaper to build on the hot path.
- Time is `float` seconds since the Unix epoch, always passed in as `now` (DESIGN rule 2).
- A `Decision` is what `core.pipeline.authorize` returns for every request that reached the policy;
  everything else leaves `authorize` as a `proxy.errors.ProxyError` (DESIGN rule 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping, NamedTuple

Effect = Literal["allow", "deny"]
Mode = Literal["enforce", "shadow"]

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID (SPIFFE ID spec section 2). Build it with `core.spiffe.parse_spiffe_id`.

    `path` is "" for a trust domain ID, otherwise starts with "/" and has no trailing slash.
    """

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified calling workload: its SPIFFE ID and the leaf certificate that proved it."""

    spiffe_id: SpiffeId
    uri: str  # str(spiffe_id), computed once
    cert_sha256: bytes  # SHA-256 of the leaf certificate DER (XFCC Hash=, RFC 8705 x5t#S256)
    not_before: float  # latest notBefore in the verified chain
    not_after: float  # earliest notAfter in the verified chain
    cert_sha256_hex: str = ""  # computed once (XFCC and every audit record use it)

    def __post_init__(self) -> None:
        if not self.cert_sha256_hex:
            object.__setattr__(self, "cert_sha256_hex", self.cert_sha256.hex())


@dataclass(frozen=True, slots=True)
class Actor:
    """One actor of an RFC 8693 `act` chain (section 4.1): who is acting, for the subject."""

    sub: str
    iss: str | None = None
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """A verified OAuth access token (JWT, RFC 9068) reduced to what decisions and audit use.

    `actors` is the delegation chain from the nested `act` claims, CURRENT actor first
    (`act.sub`, then `act.act.sub`, ...). `fingerprint` is the hex SHA-256 of the raw token: the
    only form in which a token ever reaches a log.
    """

    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: int
    fingerprint: str
    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    actors: tuple[Actor, ...] = ()
    acr: str | None = None
    amr: tuple[str, ...] = ()
    auth_time: int | None = None
    issued_at: int | None = None
    jti: str | None = None
    cnf_jkt: str | None = None  # RFC 9449 section 6: SHA-256 JWK thumbprint, base64url
    cnf_x5t_s256: str | None = None  # RFC 8705 section 3.1: SHA-256 of the client cert, base64url
    authorization_details: tuple[Mapping[str, Any], ...] = ()  # RFC 9396
    claims: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAP)  # all claims, frozen


@dataclass(frozen=True, slots=True)
class Binding:
    """How the token is bound to the presenter: "dpop" (RFC 9449), "mtls" (RFC 8705), "bearer"
    (unbound), or "none" (no token). `proof_fingerprint` is the hex SHA-256 of the DPoP proof."""

    kind: Literal["dpop", "mtls", "bearer", "none"]
    jkt: str | None = None
    proof_fingerprint: str | None = None


class Target(NamedTuple):
    """A canonical request target: what the policy sees is exactly what the upstream receives."""

    path: str  # canonical path, always starts with "/"
    query: str  # raw query without the "?", "" when absent

    @property
    def request_target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


class RequestContext(NamedTuple):
    """What a policy rule may look at: the calling workload, the request, (when a token was
    presented and verified) the human subject, the actor chain and the binding, and (when the
    route is a policy action) the action's name and typed parameters."""

    workload: SpiffeId
    workload_uri: str
    method: str
    path: str
    query: str = ""  # raw query string (no "?"); parameters are parsed by the policy when needed
    token: TokenClaims | None = None
    binding: Binding | None = None
    #: the policy action this request is (`CompiledPolicy.action_for`), and its parameters as
    #: `core.policy.actions.extract_params` read them; None / empty for requests of no action
    action: str | None = None
    params: Mapping[str, Any] = EMPTY_MAP


Effect3 = Literal["allow", "deny", "step_up"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One policy outcome: the effect, the stable code, and the rule that decided (if any).

    "step_up" (RFC 9470): an allow rule matched everything but the strength or freshness of the
    user's authentication; `acr_values` / `max_age_s` say what a new token needs."""

    effect: Effect3
    code: str
    rule_id: str | None
    acr_values: tuple[str, ...] = ()
    max_age_s: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy evaluator returns: the enforced outcome, and the would-be outcome when rules
    in shadow mode would have decided differently (None when they agree)."""

    outcome: Outcome
    shadow: Outcome | None = None


@dataclass(frozen=True, slots=True)
class Obligations:
    """What the forwarder must do when a request is allowed. Later: response field filters."""

    headers: tuple[tuple[str, str], ...] = ()


class Decision(NamedTuple):
    """The result of `authorize` for a request that reached the policy.

    `effect` is what is enforced. `mode` is "shadow" when a would-be denial was let through
    (globally or by a shadow rule); `would_be` then holds what enforcement would have done.
    """

    effect: Effect
    code: str
    rule_id: str | None
    revision: str
    mode: Mode
    peer: PeerIdentity
    target: Target
    would_be: Outcome | None = None
    obligations: Obligations = Obligations()
    token: TokenClaims | None = None
    binding: Binding | None = None
    action: str | None = None  # the policy action, when the request is one
    params: Mapping[str, Any] | None = None  # its parameters (audited as a digest)

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"
