"""`authorize(facts, state, now)`: the ONE place where the order of the checks lives.

Order (DESIGN.md section 3):
  1. the sidecar can decide at all (`state.unavailable`: stale or missing inputs) -> 503
  2. the calling workload: X.509-SVID of the TLS peer, per trust domain  -> 403 PeerIdentityError
     (when the peer is a configured L7 hop, a JWT-SVID in the configured header then names the
     workload; any other peer presenting one is refused)
  3. the request target, canonicalised once (`core.paths`)              -> 400 BadRequest
  4. the route's authentication requirement (policy `authentication`: token required / optional /
     forbidden, binding dpop / mtls / any / none)
  5. the access token (`core.tokens`, cached by digest)                  -> 401 TokenError
  6. the DPoP proof (`core.dpop`, RFC 9449 4.3 order), then the binding of the token to this
     presenter (DPoP key or mTLS certificate, RFC 8705)                 -> 401 DPoPError/TokenError
  6b. revocations from the policy bundle (workload, actors, subject, client, jti) -> 403 / 401
  6c. the policy action this request is, and its typed parameters (path, query, and — only for
      actions that need it — the JSON body the listener buffered, bounded by `body_limit`) -> 400
  7. the policy decision (deny overrides allow; nothing matched = deny; an allow rule that only
     lacks a strong or fresh enough authentication = step-up)           -> Decision / 401 RFC 9470
  8. mode: enforce -> as decided; shadow (global) -> a denial or step-up is let through and
     recorded as `would_be`; rules in shadow mode never change the enforced result, their
     differing outcome is recorded as `would_be` too.
Later issues insert transaction-token checks between 6 and 7, here and only here.

Rules: pure (no I/O, time is `now`); every way out is a `Decision` or a `ProxyError` (DESIGN rule 3);
`state` is one snapshot per request, so a reload never mixes two revisions in one request. The
mutable collaborators (replay store, token cache) are shared by snapshots and only ever grow
monotonic facts (seen jti digests, verified tokens), never policy. The target in the Decision is
the canonical one: exactly what the forwarder sends upstream.
Every 401 carries the challenge of the route: `DPoP ... algs="..."` where DPoP is accepted, else
`Bearer` (RFC 9449 7.1, RFC 6750 3). A request without any token gets a challenge without `error=`
(RFC 6750 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple
from proxy.core.bundle import Revocations
from proxy.core.dpop import DPoPConfig, NonceIssuer, check_binding, request_uri, verify_dpop_proof
from proxy.core.model import (
    EMPTY_MAP,
    Binding,
    Decision,
    Mode,
    Obligations,
    Outcome,
    PeerIdentity,
    RequestContext,
    Target,
    TokenClaims,
)
from proxy.core.paths import canonicalize_target
from proxy.core.policy import CompiledPolicy, evaluate
from proxy.core.policy.actions import extract_params
from proxy.core.replay import ReplayStore
from proxy.core.spiffe import PeerCertificates, TrustStore, verify_peer
from proxy.core.tokens import Issuers, TokenCache, verify_access_token_cached, verify_jwt_svid
from proxy.errors import (
    BadRequest,
    Denied,
    DPoPError,
    InsufficientAuthentication,
    PeerIdentityError,
    ServiceUnavailable,
    TokenError,
)

_NO_TOKEN = Binding("none")


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Names of the identity headers the forwarder sets (config `headers`)."""

    spiffe_id: str = "x-portcullis-spiffe-id"
    xfcc: bool = True
    subject: str = "x-portcullis-subject"
    issuer: str = "x-portcullis-issuer"
    actors: str = "x-portcullis-actor-chain"
    client_id: str = "x-portcullis-client-id"


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Everything the token steps read (config `tokens`, keys as currently loaded)."""

    issuers: Issuers = field(default_factory=dict)
    dpop: DPoPConfig | None = None
    public_origin: str | None = None  # normalised; the base of every DPoP `htu`
    cache: TokenCache | None = None  # mutable collaborator (verified tokens by digest)
    replay: ReplayStore | None = None  # mutable collaborator (DPoP jti digests)
    nonces: NonceIssuer | None = None
    require_nonce: bool = False
    #: JWT-SVIDs: accepted audiences, and the mTLS peers (L7 hops) allowed to present one
    jwt_svid_audiences: frozenset[str] = frozenset()
    jwt_svid_proxies: frozenset[str] = frozenset()

    @property
    def dpop_algs(self) -> str | None:
        return self.dpop.algs if self.dpop is not None else None


@dataclass(frozen=True, slots=True)
class State:
    """Everything `authorize` reads, as one snapshot (swapped whole on reload)."""

    trust: TrustStore
    policy: CompiledPolicy
    mode: Mode
    own_id: str  # the sidecar's own SPIFFE ID (XFCC By=)
    identity_headers: IdentityHeaders = IdentityHeaders()
    tokens: TokenSettings = TokenSettings()
    #: a stable code when the sidecar must fail closed (e.g. "svid_expired", "policy_stale")
    unavailable: str | None = None
    #: revoked SPIFFE IDs, subjects, clients and token ids from the active policy bundle
    revocations: Revocations | None = None
    #: memo of the workload-only obligations per peer certificate (pure function of this state)
    obligations_memo: dict = field(default_factory=dict, compare=False, repr=False)


class RequestFacts(NamedTuple):
    """Plain data the listener extracted from one request: no transport objects."""

    method: str
    raw_target: str
    peer: PeerCertificates
    authorization: tuple[str, ...] = ()  # every Authorization header value
    dpop: tuple[str, ...] = ()  # every DPoP header value
    jwt_svid: tuple[str, ...] = ()  # every value of the configured JWT-SVID header
    body: bytes | None = None  # the whole request body, only when `body_limit` asked for it
    content_type: str | None = None


def authorize(facts: RequestFacts, state: State, now: float) -> Decision:
    """Decide one request. Returns a Decision (allow, or a deny to be rendered via `deny_error`)
    or raises a ProxyError."""
    if state.unavailable is not None:
        raise ServiceUnavailable(state.unavailable, "sidecar inputs are missing or stale")

    peer = verify_peer(facts.peer, state.trust, now)
    if facts.jwt_svid:
        peer = _jwt_svid_workload(facts, state, peer, now)
    target: Target = canonicalize_target(facts.raw_target)
    policy = state.policy
    requirement = policy.authentication_for(facts.method, target.path)
    # with no issuer configured the sidecar does no token work: Authorization is the workload's
    if requirement.token == "required" or (facts.authorization and state.tokens.issuers):
        claims, binding = _authenticate(facts, state, requirement, peer, target, now)
    else:
        claims, binding = None, _NO_TOKEN

    if state.revocations:
        _check_revocations(state.revocations, peer, claims)

    action = params = None
    spec = policy.action_for(facts.method, target.path)
    if spec is not None:
        action = spec.name
        params = extract_params(spec, spec.captures(target.path), target.query, facts.body,
                                content_type=facts.content_type)
    ctx = RequestContext(peer.spiffe_id, peer.uri, facts.method, target.path, target.query,
                         claims, binding, action, params if params is not None else EMPTY_MAP)
    verdict = evaluate(policy, ctx, now=now)
    out = verdict.outcome
    revision = policy.revision
    if out.effect == "allow":
        return Decision("allow", out.code, out.rule_id, revision, state.mode, peer, target,
                        verdict.shadow, _obligations(state, peer, claims), claims, binding,
                        action, params)
    if state.mode == "shadow":
        return Decision("allow", "shadow_allowed", out.rule_id, revision, "shadow", peer, target,
                        would_be=verdict.shadow or out, obligations=_obligations(state, peer, claims),
                        token=claims, binding=binding, action=action, params=params)
    if out.effect == "step_up":
        raise _step_up(out, state, requirement.binding)
    return Decision("deny", out.code, out.rule_id, revision, state.mode, peer, target,
                    would_be=verdict.shadow, token=claims, binding=binding, action=action,
                    params=params)


def body_limit(facts: RequestFacts, state: State) -> int | None:
    """How many body bytes the decision needs to see before it can be made: the action's
    `max_body_bytes` when this request is a policy action whose parameters come from the JSON
    body, else None (the body is streamed, never inspected). A target that does not canonicalise
    needs no body: `authorize` refuses it."""
    try:
        target = canonicalize_target(facts.raw_target)
    except BadRequest:
        return None
    spec = state.policy.action_for(facts.method, target.path)
    return spec.max_body_bytes if spec is not None and spec.needs_body else None


def deny_error(decision: Decision) -> Denied:
    """The error a denial is rendered as (403 with the decision's code and rule)."""
    return Denied(decision.code, f"policy decision {decision.code}", rule_id=decision.rule_id)


# ----------------------------------------------------------------------------------------------
# tokens and binding
# ----------------------------------------------------------------------------------------------


def _scheme_for(binding: str, tokens: TokenSettings) -> str:
    return "DPoP" if binding in ("dpop", "any") and tokens.dpop is not None else "Bearer"


def _challenge(err: TokenError, scheme: str, algs: str | None) -> TokenError:
    """Give a token error the challenge of the route (RFC 9449 7.1 / RFC 6750 3)."""
    err.challenge_scheme = scheme  # type: ignore[misc]
    if scheme == "DPoP" and algs and not any(k == "algs" for k, _ in err.challenge_params):
        err.challenge_params = err.challenge_params + (("algs", algs),)
    elif scheme == "Bearer":
        err.challenge_params = tuple(p for p in err.challenge_params if p[0] != "algs")
    return err


def _authenticate(facts: RequestFacts, state: State, requirement, peer: PeerIdentity,
                  target: Target, now: float) -> tuple[TokenClaims | None, Binding]:
    tokens = state.tokens
    scheme_name = _scheme_for(requirement.binding, tokens)
    algs = tokens.dpop_algs
    if not facts.authorization:
        # RFC 6750 3.1: no credentials at all -> a challenge without an error code
        raise _challenge(TokenError("token_missing", "the route requires an access token",
                                    rfc_error=""), scheme_name, algs)
    if len(facts.authorization) > 1:
        raise _challenge(TokenError("token_multiple", "more than one Authorization header",
                                    rfc_error="invalid_request"), scheme_name, algs)
    if requirement.token == "forbidden":
        raise BadRequest("token_forbidden", "this route accepts no access token")
    scheme, _, token = facts.authorization[0].partition(" ")
    token = token.strip(" ")
    lscheme = scheme.lower()  # RFC 9110 11.1: auth-scheme is case-insensitive
    if lscheme not in ("bearer", "dpop") or not token or " " in token:
        raise _challenge(TokenError("token_malformed", "Authorization is not 'Bearer <token>' or "
                                    "'DPoP <token>'", rfc_error="invalid_request"), scheme_name, algs)
    try:
        claims = verify_access_token_cached(token, tokens.issuers, now, tokens.cache) \
            if tokens.cache is not None else _verify_uncached(token, tokens, now)
    except TokenError as err:
        if err.code == "token_keys_unavailable":
            raise ServiceUnavailable("jwks_unavailable", err.detail) from None
        raise _challenge(err, scheme_name, algs) from None

    proof = None
    if facts.dpop or lscheme == "dpop":
        if tokens.dpop is None or tokens.public_origin is None or tokens.replay is None:
            raise _challenge(DPoPError("dpop_not_accepted", "DPoP is not configured here"),
                             "Bearer", None)
        nonces = tokens.nonces
        proof = verify_dpop_proof(
            list(facts.dpop), method=facts.method,
            htu=request_uri(tokens.public_origin, target.path), access_token=token,
            config=tokens.dpop, replay=tokens.replay, now=now,
            nonce_check=(lambda n: nonces.valid(n, now)) if nonces is not None else None,
            current_nonce=(lambda: nonces.current(now)) if nonces is not None else None,
            expected_jkt=claims.cnf_jkt,
            token_sha256=bytes.fromhex(claims.fingerprint))  # SHA-256 of the ASCII token
    try:
        binding = check_binding(claims, "DPoP" if lscheme == "dpop" else "Bearer", proof,
                                peer.cert_sha256, requirement.binding, algs or "")
    except TokenError as err:
        raise _challenge(err, scheme_name, algs) from None
    return claims, binding


def _check_revocations(rev: Revocations, peer: PeerIdentity, claims: TokenClaims | None) -> None:
    """Revocations published in the policy bundle win over every rule (and over shadow mode)."""
    if peer.uri in rev.spiffe_ids:
        raise Denied("revoked_workload", "the calling workload's SPIFFE ID is revoked")
    if claims is None:
        return
    if any(a.sub in rev.spiffe_ids for a in claims.actors):
        raise Denied("revoked_actor", "an actor of the token's act chain is revoked")
    if (claims.issuer, claims.subject) in rev.subjects:
        raise Denied("revoked_subject", "the token's subject is revoked")
    if claims.client_id is not None and claims.client_id in rev.clients:
        raise TokenError("token_revoked", "the token's client is revoked")
    if claims.jti is not None and claims.jti in rev.jtis:
        raise TokenError("token_revoked", "the token's jti is revoked")


def _jwt_svid_workload(facts: RequestFacts, state: State, hop: PeerIdentity,
                       now: float) -> PeerIdentity:
    """Behind a trusted L7 hop, the JWT-SVID names the calling workload (SPIFFE JWT-SVID spec;
    keys from the bundle of the SVID's own trust domain). Only configured hops may vouch."""
    tokens = state.tokens
    if not tokens.jwt_svid_proxies or hop.uri not in tokens.jwt_svid_proxies:
        raise PeerIdentityError("jwt_svid_untrusted_hop",
                                "this peer is not allowed to present a JWT-SVID for someone else")
    if len(facts.jwt_svid) != 1:
        raise PeerIdentityError("jwt_svid_multiple", "more than one JWT-SVID header")
    try:
        sid = verify_jwt_svid(facts.jwt_svid[0], state.trust, tokens.jwt_svid_audiences, now)
    except TokenError as err:
        raise PeerIdentityError(err.code, err.detail) from None
    # the workload is the JWT-SVID's subject; the certificate that carried it is the hop's
    return PeerIdentity(sid, str(sid), hop.cert_sha256, hop.not_before, hop.not_after,
                        hop.cert_sha256_hex)


def _verify_uncached(token: str, tokens: TokenSettings, now: float) -> TokenClaims:
    from proxy.core.tokens import verify_access_token

    return verify_access_token(token, tokens.issuers, now)


def _step_up(out: Outcome, state: State, binding: str) -> InsufficientAuthentication:
    """RFC 9470 section 3: 401 insufficient_user_authentication with acr_values / max_age."""
    return InsufficientAuthentication(
        "step_up_required", f"rule {out.rule_id} needs a stronger or fresher authentication",
        acr_values=" ".join(out.acr_values) or None, max_age=out.max_age_s,
        scheme=_scheme_for(binding, state.tokens), rule_id=out.rule_id)


# ----------------------------------------------------------------------------------------------
# obligations
# ----------------------------------------------------------------------------------------------

_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%"), ord(",")}


def header_value(text: str) -> str:
    """A claim value made safe for an HTTP header: visible ASCII except `%` and `,` kept, every
    other byte of its UTF-8 form percent-encoded (so no CR/LF/NUL can ever be injected)."""
    if (text.isascii() and text.isprintable() and " " not in text and "%" not in text
            and "," not in text):
        return text  # the common case, decided in C: every character is in _SAFE
    raw = text.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def _obligations(state: State, peer: PeerIdentity, claims: TokenClaims | None) -> Obligations:
    """The identity headers for the upstream: a function of the peer certificate and of the raw
    token (its fingerprint), so they are built once per (certificate, token) and memoised in the
    state (bounded: cleared at 4096 entries; a new state starts empty)."""
    key = (peer.uri, peer.cert_sha256) if claims is None else \
        (peer.uri, peer.cert_sha256, claims.fingerprint)
    memo = state.obligations_memo
    got = memo.get(key)
    if got is None:
        if len(memo) >= 4096:
            memo.clear()
        got = memo[key] = _build_obligations(state, peer, claims)
    return got


def _build_obligations(state: State, peer: PeerIdentity, claims: TokenClaims | None) -> Obligations:
    if claims is None:
        return Obligations(headers=_workload_headers(state, peer))
    hdrs = state.identity_headers
    out = list(_workload_headers(state, peer))
    out.append((hdrs.issuer, header_value(claims.issuer)))
    if claims.subject:
        out.append((hdrs.subject, header_value(claims.subject)))
    if claims.actors:
        out.append((hdrs.actors, ",".join(header_value(a.sub) for a in claims.actors)))
    if claims.client_id:
        out.append((hdrs.client_id, header_value(claims.client_id)))
    return Obligations(headers=tuple(out))


def _workload_headers(state: State, peer: PeerIdentity) -> tuple[tuple[str, str], ...]:
    hdrs = state.identity_headers
    out: tuple[tuple[str, str], ...] = ((hdrs.spiffe_id, peer.uri),)
    if hdrs.xfcc:
        # Envoy's SANITIZE_SET format: By=<our SPIFFE ID>;Hash=<sha256 hex of the peer leaf>;URI=<peer>
        out += (("x-forwarded-client-cert",
                 f"By={state.own_id};Hash={peer.cert_sha256_hex};URI={peer.uri}"),)
    return out
