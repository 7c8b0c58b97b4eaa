"""`authorize(facts, state, now)`: the ONE place where the order of the checks lives.

Order (DESIGN.md section 3):
  1. the sidecar can decide at all (`state.unavailable`: stale or missing inputs) -> 503
  2. the calling workload: X.509-SVID of the TLS peer, per trust domain  -> 403 PeerIdentityError
  3. the request target, canonicalised once (`core.paths`)              -> 400 BadRequest
  4. the policy decision (deny overrides allow; nothing matched = deny)  -> Decision
  5. mode: enforce -> as decided; shadow (global) -> a denial is let through and recorded as
     `would_be`; rules in shadow mode never change the enforced result, their differing outcome is
     recorded as `would_be` too.
Later issues insert token, binding and transaction-token checks between 2 and 4, here and only here.

Rules: pure (no I/O, time is `now`); every way out is a `Decision` or a `ProxyError` (DESIGN rule 3);
`state` is one immutable snapshot per request, so a reload never mixes two revisions in one request.
The target in the Decision is the canonical one: it is exactly what the forwarder sends upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.core.model import Decision, Mode, Obligations, RequestContext, Target
from proxy.core.paths import canonicalize_target
from proxy.core.policy import CompiledPolicy, evaluate
from proxy.core.spiffe import PeerCertificates, TrustStore, verify_peer
from proxy.errors import Denied, ServiceUnavailable


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Names of the identity headers the forwarder sets (config `headers`)."""

    spiffe_id: str = "x-portcullis-spiffe-id"
    xfcc: bool = True


@dataclass(frozen=True, slots=True)
class State:
    """Everything `authorize` reads, as one immutable snapshot (swapped whole on reload)."""

    trust: TrustStore
    policy: CompiledPolicy
    mode: Mode
    own_id: str  # the sidecar's own SPIFFE ID (XFCC By=)
    identity_headers: IdentityHeaders = IdentityHeaders()
    #: a stable code when the sidecar must fail closed (e.g. "svid_expired", "policy_stale")
    unavailable: str | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """Plain data the listener extracted from one request: no transport objects."""

    method: str
    raw_target: str
    peer: PeerCertificates


def authorize(facts: RequestFacts, state: State, now: float) -> Decision:
    """Decide one request. Returns a Decision (allow, or a deny to be rendered via `deny_error`)
    or raises a ProxyError."""
    if state.unavailable is not None:
        raise ServiceUnavailable(state.unavailable, "sidecar inputs are missing or stale")

    peer = verify_peer(facts.peer, state.trust, now)
    target: Target = canonicalize_target(facts.raw_target)

    ctx = RequestContext(workload=peer.spiffe_id, workload_uri=peer.uri, method=facts.method,
                         path=target.path)
    verdict = evaluate(state.policy, ctx)
    out = verdict.outcome
    revision = state.policy.revision
    if out.effect == "allow":
        return Decision("allow", out.code, out.rule_id, revision, state.mode, peer, target,
                        would_be=verdict.shadow, obligations=_obligations(state, peer))
    if state.mode == "shadow":
        return Decision("allow", "shadow_allowed", out.rule_id, revision, "shadow", peer, target,
                        would_be=verdict.shadow or out, obligations=_obligations(state, peer))
    return Decision("deny", out.code, out.rule_id, revision, state.mode, peer, target,
                    would_be=verdict.shadow)


def deny_error(decision: Decision) -> Denied:
    """The error a denial is rendered as (403 with the decision's code and rule)."""
    return Denied(decision.code, f"policy decision {decision.code}", rule_id=decision.rule_id)


def _obligations(state: State, peer) -> Obligations:
    hdrs = state.identity_headers
    out = [(hdrs.spiffe_id, peer.uri)]
    if hdrs.xfcc:
        # Envoy's SANITIZE_SET format: By=<our SPIFFE ID>;Hash=<sha256 hex of the peer leaf>;URI=<peer>
        out.append(("x-forwarded-client-cert",
                    f"By={state.own_id};Hash={peer.cert_sha256.hex()};URI={peer.uri}"))
    return Obligations(headers=tuple(out))
