"""Shared vocabulary of the decision core: plain frozen values, no behaviour that does I/O.

Rules:
- Everything here is immutable (frozen dataclasses with slots) so a value can be shared between
  a request and the audit record, and a snapshot can never change under a request.
- Time is `float` seconds since the Unix epoch, always passed in as `now` (DESIGN rule 2).
- A `Decision` is what `core.pipeline.authorize` returns for every request that reached the policy;
  everything else leaves `authorize` as a `proxy.errors.ProxyError` (DESIGN rule 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping

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

    @property
    def cert_sha256_hex(self) -> str:
        return self.cert_sha256.hex()


@dataclass(frozen=True, slots=True)
class Target:
    """A canonical request target: what the policy sees is exactly what the upstream receives."""

    path: str  # canonical path, always starts with "/"
    query: str  # raw query without the "?", "" when absent

    @property
    def request_target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a policy rule may look at. Later issues add subject, actor chain, action, params."""

    workload: SpiffeId
    workload_uri: str
    method: str
    path: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """One policy outcome: the effect, the stable code, and the rule that decided (if any)."""

    effect: Effect
    code: str
    rule_id: str | None


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


@dataclass(frozen=True, slots=True)
class Decision:
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
    obligations: Obligations = field(default_factory=Obligations)

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"
