"""Property tests of the whole decision (`proxy.core.pipeline.authorize`) against hostile
`Authorization` and `DPoP` headers.

The State is real: a policy compiled from a document, a TrustStore holding the bundle of a
`proxy.dev.ca.DevCA`, the caller's real X.509-SVID chain, and TokenSettings with a real issuer
(its JWKS made by `proxy.dev.tokens`), a DPoP configuration, a token cache and a (large) replay
store. Tokens and proofs are minted by `proxy.dev.tokens`, the product's own dev tooling.

For every input, `authorize`:
- raises nothing but a `ProxyError`, and every raised error is a 400 or a 401 (a 503 could only
  come from a full replay store, which is configured far larger than these tests fill);
- returns an allow Decision exactly when the token and the proof are the valid ones (the route
  requires a DPoP-bound token, the rule requires the token's subject, its current actor to be the
  mTLS peer, and nothing else); `test_signed_tokens_with_arbitrary_claims` uses the token
  verifier itself as the oracle, since there many different tokens are valid.
Every valid proof is minted fresh for its example (proofs are single-use).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.dpop import DPoPConfig, NonceIssuer, normalize_origin
from proxy.core.jose import b64url_decode, b64url_encode, parse_jwks
from proxy.core.pipeline import RequestFacts, State, TokenSettings, authorize, header_value
from proxy.core.policy import compile_policy
from proxy.core.replay import MemoryReplayStore
from proxy.core.spiffe import PeerCertificates, TrustStore, parse_pem_bundle
from proxy.core.tokens import IssuerPolicy, TokenCache, verify_access_token
from proxy.dev import tokens as devtokens
from proxy.dev.ca import DevCA
from proxy.errors import InvalidValue, ProxyError, TokenError

NOW = 1_800_000_000
TD = "example.org"
FRONTEND_ID = f"spiffe://{TD}/ns/demo/sa/frontend"
BATCH_ID = f"spiffe://{TD}/ns/demo/sa/batch"
ISS = "https://idp.example.org"
AUD = "https://orders.example.org"
ORIGIN = "https://orders.example.org:8443"
PATH = "/api/orders/42"
URL = ORIGIN + PATH
KID = "idp-1"
ALLOWED_STATUSES = (400, 401)

POLICY = compile_policy({
    "version": 1,
    "revision": "properties-1",
    "authentication": [{"paths": ["/api/**"], "token": "required", "binding": "dpop"}],
    "rules": [{"id": "alice-via-frontend", "effect": "allow",
               "from": {"subjects": [{"issuer": ISS, "sub": "alice"}], "actors": [FRONTEND_ID]},
               "require": {"peer_is": "actor"},
               "to": [{"paths": ["/api/**"]}]}],
}, known_trust_domains=frozenset({TD}))

CA = DevCA.create(TD, now=NOW)
TRUST = TrustStore.of([parse_pem_bundle(TD, CA.bundle_pem())], version=1)
PEERS = {"frontend": PeerCertificates(CA.issue_svid(FRONTEND_ID, now=NOW).chain_der()),
         "batch": PeerCertificates(CA.issue_svid(BATCH_ID, now=NOW).chain_der())}

ISSUER_KEY = devtokens.new_signing_key("ES256")
JWKS = parse_jwks(devtokens.issuer_jwks(ISSUER_KEY, kid=KID, alg="ES256"))
ISSUERS = {ISS: (IssuerPolicy(issuer=ISS, audiences=frozenset({AUD}),
                              algorithms=frozenset({"ES256"}), require_at_jwt_typ=True), JWKS)}
PROOF_KEY = devtokens.new_signing_key("ES256")
OTHER_KEY = devtokens.new_signing_key("ES256")
PROOF_JKT = devtokens.jwk_thumbprint(PROOF_KEY)
DPOP = DPoPConfig(algorithms=frozenset({"ES256", "EdDSA"}))
NONCES = NonceIssuer(b"n" * 32, rotate_s=300)


def _state(*, cache: bool, require_nonce: bool = False) -> State:
    dpop = DPoPConfig(algorithms=DPOP.algorithms, require_nonce=require_nonce)
    return State(trust=TRUST, policy=POLICY, mode="enforce", own_id=f"spiffe://{TD}/sidecar",
                 tokens=TokenSettings(issuers=ISSUERS, dpop=dpop,
                                      public_origin=normalize_origin(ORIGIN),
                                      cache=TokenCache(1000) if cache else None,
                                      replay=MemoryReplayStore(10_000_000),
                                      nonces=NONCES if require_nonce else None,
                                      require_nonce=require_nonce))


STATES = {"cached": _state(cache=True), "uncached": _state(cache=False)}
NONCE_STATE = _state(cache=True, require_nonce=True)


def mint(**kw: Any) -> str:
    base: dict[str, Any] = {"kid": KID, "iss": ISS, "aud": AUD, "sub": "alice", "now": NOW,
                            "actors": [FRONTEND_ID], "cnf_jkt": PROOF_JKT}
    base.update(kw)
    return devtokens.mint_access_token(ISSUER_KEY, **base)


TOKEN = mint()
H64, P64, S64 = TOKEN.split(".")


def fresh_proof(*, key: Any = PROOF_KEY, method: str = "GET", url: str = URL,
                token: str | None = TOKEN, now: int = NOW, nonce: str | None = None) -> str:
    return devtokens.mint_dpop_proof(key, method=method, url=url, access_token=token, now=now,
                                     nonce=nonce)


def decide(state: State, peer: str, method: str, auth: tuple[str, ...],
           dpop: tuple[str, ...]):
    """(decision or None, error or None); anything but a ProxyError propagates and fails."""
    try:
        return authorize(RequestFacts(method, PATH, PEERS[peer], auth, dpop), state, NOW), None
    except ProxyError as err:
        assert err.status in ALLOWED_STATUSES, (err.status, err.code, err.detail)
        return None, err


def allowed(decision: Any) -> bool:
    return decision is not None and decision.effect == "allow"


# --------------------------------------------------------------------------------------------
# What counts as "the valid one"
# --------------------------------------------------------------------------------------------


def is_valid_auth(values: tuple[str, ...]) -> bool:
    """Exactly one Authorization value, scheme DPoP (any case, RFC 9110 11.1) and our token."""
    if len(values) != 1:
        return False
    scheme, _, token = values[0].partition(" ")
    return scheme.lower() == "dpop" and token.strip(" ") == TOKEN


def same_jws(value: str, reference: str) -> bool:
    """`value` is `reference` up to surrounding OWS and the base64url spelling of the signature
    (strict base64url still ignores a last character's unused low bits; the signed parts must be
    the very same characters, since they are the signing input)."""
    parts, ref = value.strip(" \t").split("."), reference.split(".")
    if len(parts) != 3 or parts[:2] != ref[:2]:
        return False
    try:
        return b64url_decode(parts[2]) == b64url_decode(ref[2])
    except InvalidValue:
        return False


def is_valid_proof(values: tuple[str, ...], proof: str) -> bool:
    return len(values) == 1 and same_jws(values[0], proof)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

b64_part = st.binary(max_size=80).map(b64url_encode)
b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
garbage_payload = st.one_of(
    b64_part,  # not JSON at all
    json_values.map(lambda v: b64url_encode(json.dumps(v).encode())),  # JSON, maybe no object
    st.text(max_size=30).map(lambda t: b64url_encode(t.encode("utf-8", "surrogatepass"))),
)


def _replace(text: str, pos: int, ch: str) -> str:
    i = pos % len(text)
    return text[:i] + ch + text[i + 1:]


near_miss_tokens = st.one_of(
    st.lists(b64_part, min_size=1, max_size=5).map(".".join),  # random base64 parts
    st.tuples(garbage_payload, b64_part).map(lambda t: f"{H64}.{t[0]}.{t[1]}"),  # valid header
    st.integers(0, len(S64) - 1).map(lambda n: f"{H64}.{P64}.{S64[:n]}"),  # truncated signature
    st.integers(0, len(TOKEN) - 1).map(lambda n: TOKEN[:n]),  # truncated anywhere
    st.tuples(st.integers(0, len(TOKEN)), st.sampled_from(b64_alphabet + ".= %\x00é"))
    .map(lambda t: _replace(TOKEN, *t)),  # one character changed
    st.integers(8_000, 70_000).map(lambda n: TOKEN + "A" * n),  # huge
    st.integers(8_000, 70_000).map(lambda n: "x" * n),
    st.just(TOKEN),
)
schemes = st.sampled_from(["DPoP", "dpop", "DPOP", "Bearer", "bearer", "Basic", "", "DPoP ",
                           "DPoP\t", "Token"])
authorization_values = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=200),
    st.tuples(schemes, near_miss_tokens).map(lambda t: f"{t[0]} {t[1]}"),
    st.tuples(schemes, st.sampled_from(["", " ", "  "]), near_miss_tokens)
    .map(lambda t: f"{t[0]}{t[1]}{t[2]}"),
)

# A DPoP value is built per example (the valid proof must be fresh): a recipe here, built by
# `build_proofs`. ("valid",) is THE proof; the others are near misses of it.
WRONG = ("method", "url", "no_ath", "other_token", "old", "future", "other_key", "unbound_key")
proof_recipes = st.one_of(
    st.just(("valid",)),
    st.tuples(st.just("pad"), st.sampled_from([" ", "\t", "  "])),
    st.tuples(st.just("wrong"), st.sampled_from(WRONG)),
    st.tuples(st.just("mutate"), st.integers(0, 10_000), st.sampled_from(b64_alphabet + ".,= ")),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("parts"), st.lists(b64_part, min_size=1, max_size=4)),
    st.tuples(st.just("garbage_payload"), garbage_payload),
    st.tuples(st.just("text"), st.text(max_size=100)),
    st.tuples(st.just("huge"), st.integers(4_000, 70_000)),
)
# one value is what clients send: make it the common case, several values the exception
proof_lists = st.one_of(st.tuples(proof_recipes).map(list), st.lists(proof_recipes, max_size=3))
authorization_lists = st.one_of(st.tuples(authorization_values),
                                st.lists(authorization_values, max_size=3).map(tuple))


def build_proof(recipe: tuple, proof: str) -> str:
    kind = recipe[0]
    if kind == "valid":
        return proof
    if kind == "pad":
        return recipe[1] + proof + recipe[1]
    if kind == "wrong":
        what = recipe[1]
        if what == "method":
            return fresh_proof(method="POST")
        if what == "url":
            return fresh_proof(url=ORIGIN + "/api/orders/43")
        if what == "no_ath":
            return fresh_proof(token=None)
        if what == "other_token":
            return fresh_proof(token=TOKEN + "x")
        if what == "old":
            return fresh_proof(now=NOW - 3600)
        if what == "future":
            return fresh_proof(now=NOW + 3600)
        if what == "other_key":
            return fresh_proof(key=OTHER_KEY)
        return fresh_proof(key=devtokens.new_signing_key("EdDSA"))
    if kind == "mutate":
        return _replace(proof, recipe[1], recipe[2])
    if kind == "truncate":
        return proof[:recipe[1] % len(proof)]
    if kind == "parts":
        return ".".join(recipe[1])
    if kind == "garbage_payload":
        h64, _, s64 = proof.split(".")
        return f"{h64}.{recipe[1]}.{s64}"
    if kind == "text":
        return recipe[1]
    return proof + "A" * recipe[1]


def build_proofs(recipes: list[tuple]) -> tuple[tuple[str, ...], str]:
    proof = fresh_proof()
    return tuple(build_proof(r, proof) for r in recipes), proof


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(auth=authorization_lists, recipes=proof_lists,
       peer=st.sampled_from(sorted(PEERS)), method=st.sampled_from(["GET", "POST"]),
       cache=st.sampled_from(sorted(STATES)))
def test_arbitrary_authorization_headers(auth: tuple[str, ...], recipes: list[tuple], peer: str,
                                         method: str, cache: str) -> None:
    dpop, proof = build_proofs(recipes)
    decision, _err = decide(STATES[cache], peer, method, auth, dpop)
    expected = (is_valid_auth(auth) and is_valid_proof(dpop, proof) and peer == "frontend"
                and method == "GET")
    assert allowed(decision) == expected


@SETTINGS
@given(scheme=st.sampled_from(["DPoP", "dpop", "DPoP  "]), recipes=proof_lists,
       peer=st.sampled_from(sorted(PEERS)), cache=st.sampled_from(sorted(STATES)))
def test_the_valid_token_with_arbitrary_dpop_headers(scheme: str, recipes: list[tuple],
                                                     peer: str, cache: str) -> None:
    dpop, proof = build_proofs(recipes)
    auth = (f"{scheme} {TOKEN}",)
    decision, err = decide(STATES[cache], peer, "GET", auth, dpop)
    expected = is_valid_proof(dpop, proof) and peer == "frontend"
    assert allowed(decision) == expected
    if not expected and peer == "frontend":
        assert err is not None and err.status == 401  # a bad proof never reaches the policy


def test_the_valid_pair_is_allowed_once_and_its_replay_refused() -> None:
    """The positive anchor of the properties above: the valid pair really is allowed."""
    proof = fresh_proof()
    facts = RequestFacts("GET", PATH, PEERS["frontend"], (f"DPoP {TOKEN}",), (proof,))
    decision = authorize(facts, STATES["cached"], NOW)
    assert decision.effect == "allow" and decision.rule_id == "alice-via-frontend"
    assert decision.binding.kind == "dpop" and decision.binding.jkt == PROOF_JKT
    decision, err = decide(STATES["cached"], "frontend", "GET", facts.authorization, (proof,))
    assert decision is None and err.code == "dpop_replayed"


CLAIM_NAMES = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "client_id", "scope", "scp",
               "acr", "amr", "auth_time", "act", "cnf", "authorization_details")
act_values = st.recursive(
    st.fixed_dictionaries({"sub": st.sampled_from([FRONTEND_ID, BATCH_ID, "", "agent"])}),
    lambda inner: st.fixed_dictionaries({"sub": st.sampled_from([FRONTEND_ID, "agent"]),
                                         "act": inner}),
    max_leaves=10)
claim_values = st.one_of(
    json_values,
    st.sampled_from([ISS, AUD, "alice", NOW + 300, NOW - 300, [AUD, "x"], {"jkt": PROOF_JKT},
                     {"x5t#S256": PROOF_JKT}, {"jkt": PROOF_JKT, "other": 1}, "a b", "\\ud800"]),
    act_values,
    st.lists(st.fixed_dictionaries({"type": json_values}), max_size=2),
)
claim_overrides = st.dictionaries(st.sampled_from(CLAIM_NAMES) | st.text(max_size=6),
                                  claim_values, max_size=4)
header_overrides = st.dictionaries(
    st.sampled_from(["typ", "kid", "alg", "crit", "jku", "jwk", "x5c", "cty"]),
    st.one_of(json_values, st.sampled_from(["at+jwt", "JWT", KID, "ES256", "none", "HS256",
                                            "RS256", "EdDSA"])),
    max_size=2)


def signed_token(claims: dict[str, Any], header: dict[str, Any], surrogate: bool) -> str:
    """A JWS signed with the issuer's real key over exactly this header and payload (ES256 key,
    whatever `alg` the header claims). JSON is ASCII-escaped, so "\\ud800" stays a lone
    surrogate escape when `surrogate`."""
    payload = json.dumps(claims)
    if surrogate:
        payload = payload.replace("\\\\ud800", "\\ud800")
    si = (f"{b64url_encode(json.dumps(header).encode())}."
          f"{b64url_encode(payload.encode())}")
    return f"{si}.{b64url_encode(devtokens.sign(ISSUER_KEY, 'ES256', si.encode()))}"


@SETTINGS
@given(overrides=claim_overrides, drop=st.sets(st.sampled_from(CLAIM_NAMES), max_size=3),
       header=st.one_of(st.just({}), header_overrides), surrogate=st.booleans(), peer=st.sampled_from(sorted(PEERS)),
       scheme=st.sampled_from(["DPoP", "Bearer"]))
def test_signed_tokens_with_arbitrary_claims(overrides: dict[str, Any], drop: set[str],
                                             header: dict[str, Any], surrogate: bool, peer: str,
                                             scheme: str) -> None:
    base_header, base_claims = (json.loads(b64url_decode(p)) for p in (H64, P64))
    claims = {k: v for k, v in base_claims.items() if k not in drop}
    claims.update(overrides)
    token = signed_token(claims, {**base_header, **header}, surrogate)
    proof = fresh_proof(token=token)
    decision, _err = decide(STATES["uncached"], peer, "GET", (f"{scheme} {token}",), (proof,))
    if allowed(decision):  # then the verifier accepts it and it is exactly what the rule asks
        verified = verify_access_token(token, ISSUERS, NOW)
        assert scheme == "DPoP" and peer == "frontend"
        assert (verified.issuer, verified.subject) == (ISS, "alice")
        assert verified.cnf_jkt == PROOF_JKT and verified.actors[0].sub == FRONTEND_ID
    else:
        try:
            verified = verify_access_token(token, ISSUERS, NOW)
        except TokenError:
            return
        # a token the verifier accepts is refused only for a reason the rule or binding gives
        assert (scheme != "DPoP" or peer != "frontend" or verified.subject != "alice"
                or not verified.actors or verified.actors[0].sub != FRONTEND_ID
                or verified.cnf_jkt != PROOF_JKT or verified.cnf_x5t_s256 is not None)


nonce_values = st.one_of(
    st.just(NONCES.current(NOW)),
    st.just(NONCES.current(NOW - 300)),  # the previous window: still valid
    st.just(NONCES.current(NOW - 600)),  # two windows back: expired
    st.just(NONCES.current(NOW + 300)),  # the next window: not issued yet
    st.tuples(st.integers(0, 23), st.sampled_from(b64_alphabet))
    .map(lambda t: _replace(NONCES.current(NOW), *t)),
    st.text(max_size=40).filter(bool),
    st.none(),
)


@SETTINGS
@given(nonce=nonce_values)
def test_required_nonce(nonce: str | None) -> None:
    proof = fresh_proof(nonce=nonce)
    decision, err = decide(NONCE_STATE, "frontend", "GET", (f"DPoP {TOKEN}",), (proof,))
    if nonce is not None and NONCES.valid(nonce, NOW):
        assert allowed(decision)
    else:
        assert err is not None and err.code == "dpop_nonce_required"
        assert ("DPoP-Nonce", NONCES.current(NOW)) in err.extra_headers
        assert 'error="use_dpop_nonce"' in err.challenge()


# --------------------------------------------------------------------------------------------
# Identity headers (obligations): percent-encoding, and one memo entry per token
# --------------------------------------------------------------------------------------------

_SAFE_BYTES = set(range(0x21, 0x7F)) - {ord("%"), ord(",")}


def _header_value_reference(text: str) -> str:
    """The definition: every UTF-8 byte outside visible ASCII, '%' and ',' percent-encoded."""
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}"
                   for b in text.encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F),
                                      max_size=40))
def test_header_value_is_the_percent_encoding_definition(text: str) -> None:
    got = header_value(text)
    assert got == _header_value_reference(text)
    assert all(0x21 <= ord(c) < 0x7F for c in got)  # never CR, LF, NUL, space or non-ASCII


def test_header_value_edge_characters() -> None:
    for raw, want in [("alice", "alice"), ("a b", "a%20b"), ("a,b", "a%2Cb"), ("50%", "50%25"),
                      ("a\r\nX: y", "a%0D%0AX:%20y"), ("\x00", "%00"), ("\x7f", "%7F"),
                      ("é", "%C3%A9"), ("\ud800", "%ED%A0%80"), ("~!", "~!")]:
        assert header_value(raw) == want, raw


def test_each_token_gets_its_own_identity_headers_from_the_memo() -> None:
    state = _state(cache=True)
    seen = {}
    for client in ["app-1", "app 2,%", "app-1", "app\r\n3"]:
        token = mint(client_id=client)
        decision, err = decide(state, "frontend", "GET", (f"DPoP {token}",),
                               (fresh_proof(token=token),))
        assert err is None and allowed(decision)
        values = [v for _, v in decision.obligations.headers]
        assert header_value(client) in values and "alice" in values
        assert FRONTEND_ID in values
        seen.setdefault(client, decision.obligations)
    assert len({id(o) for o in seen.values()}) == 3  # distinct tokens never share an entry
