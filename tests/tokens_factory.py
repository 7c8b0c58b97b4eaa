"""Test factory: signing keys, JWKS documents and signed JWTs, minted with `cryptography` directly.

The signer here is independent of the verifier under test (`proxy.core.jose`): it builds the JWS
compact serialization (RFC 7515 7.1) by hand and converts ECDSA signatures to the raw R||S form of
RFC 7518 3.4 itself. It can also build the broken tokens the verifier must refuse (unsigned,
HMAC-"signed" with a public key, truncated or zero signatures, arbitrary headers).

Typical use:

    issuer = TokenIssuer.create(now=NOW)                  # ES256 key "k1", iss/aud defaults
    token = issuer.token(scope="read", act={"sub": "agent"})
    claims = verify_access_token(token, issuer.issuers(), NOW)

Keys from `key(alg, name)` are generated once per process and shared (RSA generation is slow);
use `new_key` for a key nobody else has.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from proxy.core.jose import JWKSet, b64url_encode, parse_jwks
from proxy.dev.ca import public_jwk

#: Drop a claim or header member from the defaults: `issuer.token(sub=DROP)`.
DROP: Any = type("Drop", (), {"__repr__": lambda self: "DROP"})()
_DEFAULT: Any = object()

_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC = {"ES256": (ec.SECP256R1, 32), "ES384": (ec.SECP384R1, 48), "ES512": (ec.SECP521R1, 66)}
ALL_ALGS = ("ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512",
            "PS256", "PS384", "PS512")


def b64json(obj: Any) -> str:
    """base64url of compact JSON (or of the bytes/str given as is)."""
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
    elif isinstance(obj, (bytes, bytearray)):
        raw = bytes(obj)
    else:
        raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return b64url_encode(raw)


def _key_family(alg: str) -> str:
    if alg in _EC:
        return alg
    if alg == "EdDSA":
        return "Ed25519"
    if alg[:2] in ("RS", "PS"):
        return "RSA"
    raise ValueError(f"no key type for {alg}")


def _generate(alg: str, rsa_bits: int = 2048) -> Any:
    family = _key_family(alg)
    if family in _EC:
        return ec.generate_private_key(_EC[family][0]())
    if family == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


@dataclass(frozen=True)
class TestKey:
    """A private signing key with its JWS algorithm and kid."""

    __test__ = False  # not a pytest class

    alg: str
    kid: str
    private: Any

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def public_jwk(self, *, with_alg: bool = True, with_kid: bool = True, **extra: Any) -> dict:
        jwk: dict[str, Any] = dict(public_jwk(self.public))
        if with_kid:
            jwk["kid"] = self.kid
        if with_alg:
            jwk["alg"] = self.alg
        jwk.update(extra)
        return jwk

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def with_kid(self, kid: str) -> TestKey:
        return TestKey(self.alg, kid, self.private)

    def with_alg(self, alg: str) -> TestKey:
        """The same key under another algorithm of its family (RS256 -> PS512...)."""
        if _key_family(alg) != _key_family(self.alg):
            raise ValueError(f"{alg} cannot use a {self.alg} key")
        return TestKey(alg, self.kid, self.private)

    def sign(self, data: bytes, alg: str | None = None) -> bytes:
        """The JWS signature of `data` (RFC 7518 section 3)."""
        alg = alg or self.alg
        if alg in _EC:
            der = self.private.sign(data, ec.ECDSA(_HASH[alg[2:]]()))
            r, s = decode_dss_signature(der)
            size = _EC[alg][1]
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if alg == "EdDSA":
            return self.private.sign(data)
        h = _HASH[alg[2:]]
        if alg.startswith("RS"):
            return self.private.sign(data, padding.PKCS1v15(), h())
        return self.private.sign(data, padding.PSS(mgf=padding.MGF1(h()),
                                                   salt_length=h.digest_size), h())


def new_key(alg: str = "ES256", kid: str | None = None, *, rsa_bits: int = 2048) -> TestKey:
    """A fresh key nobody else holds."""
    private = _generate(alg, rsa_bits)
    return TestKey(alg, kid or f"{alg.lower()}-{id(private):x}", private)


@functools.lru_cache(maxsize=None)
def _shared_private(family: str, name: str, rsa_bits: int) -> Any:
    alg = {"RSA": "RS256", "Ed25519": "EdDSA"}.get(family, family)
    return _generate(alg, rsa_bits)


def key(alg: str = "ES256", name: str = "k1", *, rsa_bits: int = 2048) -> TestKey:
    """A key shared per process for (key family, name); kid is `name`. RS*/PS* of one name share
    one RSA key."""
    return TestKey(alg, name, _shared_private(_key_family(alg), name, rsa_bits))


def jwks_doc(*keys: TestKey | Mapping[str, Any], with_alg: bool = True) -> dict:
    """A JWK Set document (RFC 7517 section 5) of the public keys (or raw JWK dicts) given."""
    return {"keys": [k.public_jwk(with_alg=with_alg, use="sig") if isinstance(k, TestKey)
                     else dict(k) for k in keys]}


def jwk_set(*keys: TestKey | Mapping[str, Any], with_alg: bool = True) -> JWKSet:
    return parse_jwks(jwks_doc(*keys, with_alg=with_alg))


def signing_input(header: Mapping[str, Any] | str | bytes,
                  payload: Mapping[str, Any] | str | bytes) -> str:
    return f"{b64json(header)}.{b64json(payload)}"


def sign_jws(header: Mapping[str, Any] | str | bytes, payload: Mapping[str, Any] | str | bytes,
             signer: TestKey | None, *, alg: str | None = None,
             signature: bytes | None = None) -> str:
    """A compact JWS of exactly this header and payload. `signature` overrides the computed one
    (b"" for an unsigned token); with `signer` None and no `signature`, the signature is empty."""
    si = signing_input(header, payload)
    if signature is None:
        signature = signer.sign(si.encode("ascii"), alg) if signer is not None else b""
    return f"{si}.{b64url_encode(signature)}"


def hmac_jws(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes) -> str:
    """An HS256/384/512 token (the algorithm confusion attack: pass a public key as `secret`)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    si = signing_input(header, payload)
    mac = hmac.new(secret, si.encode("ascii"), digest[header["alg"]]).digest()
    return f"{si}.{b64url_encode(mac)}"


def mint(signer: TestKey, claims: Mapping[str, Any], *, alg: str | None = None,
         kid: str | None = _DEFAULT, typ: str | None = None, **header_extra: Any) -> str:
    """A JWT signed by `signer`: header {alg, kid (signer's unless given; None drops it), typ}."""
    header: dict[str, Any] = {"alg": alg or signer.alg}
    kid = signer.kid if kid is _DEFAULT else kid
    if kid is not None:
        header["kid"] = kid
    if typ is not None:
        header["typ"] = typ
    header.update(header_extra)
    return sign_jws(header, dict(claims), signer, alg=alg)


def _apply(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@dataclass
class TokenIssuer:
    """An authorization server for tests: a signing key, its JWKS, default claims, and the
    `IssuerPolicy` / issuers mapping the verifier is configured with."""

    issuer: str
    audience: str
    signer: TestKey
    now: float
    ttl_s: int = 300
    extra_keys: tuple[TestKey, ...] = ()
    policy_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, *, now: float, issuer: str = "https://issuer.example",
               audience: str = "https://api.example", alg: str = "ES256", name: str = "k1",
               **kw: Any) -> TokenIssuer:
        return cls(issuer, audience, key(alg, name), now, **kw)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        base = {"iss": self.issuer, "sub": "user-1", "aud": self.audience,
                "exp": int(self.now) + self.ttl_s, "iat": int(self.now),
                "jti": "jti-1", "client_id": "client-1", "scope": "read"}
        return _apply(base, overrides)

    def token(self, *, header: Mapping[str, Any] | None = None, signer: TestKey | None = None,
              **claim_overrides: Any) -> str:
        """A signed token with the default claims (override or DROP any) and header members
        (`header={"typ": "at+jwt"}`, `header={"kid": DROP}`)."""
        signer = signer or self.signer
        head = _apply({"alg": signer.alg, "kid": signer.kid}, header or {})
        return sign_jws(head, self.claims(**claim_overrides), signer)

    def jwks(self) -> JWKSet:
        return jwk_set(self.signer, *self.extra_keys)

    def policy(self, **kw: Any):
        from proxy.core.tokens import IssuerPolicy

        args: dict[str, Any] = {"issuer": self.issuer, "audiences": frozenset({self.audience}),
                                "algorithms": frozenset({self.signer.alg,
                                                         *(k.alg for k in self.extra_keys)})}
        args.update(self.policy_defaults)
        args.update(kw)
        return IssuerPolicy(**args)

    def issuers(self, *, jwks: JWKSet | None | Any = _DEFAULT, **policy_kw: Any) -> dict:
        """{iss: (IssuerPolicy, JWKSet)} as `verify_access_token` takes it."""
        return {self.issuer: (self.policy(**policy_kw),
                              self.jwks() if jwks is _DEFAULT else jwks)}


# --------------------------------------------------------------------------------------------
# JWT-SVIDs
# --------------------------------------------------------------------------------------------


def mint_jwt_svid(signer: TestKey, spiffe_id: str, audience: Any, *, now: float,
                  ttl_s: int = 300, kid: Any = _DEFAULT, typ: Any = "JWT",
                  header: Mapping[str, Any] | None = None, **claims: Any) -> str:
    """A JWT-SVID (JWT-SVID.md): header {alg, kid, typ} (+ `header`), claims sub / aud / exp /
    iat (+ `claims`); any of them set to DROP is left out."""
    body = _apply({"sub": spiffe_id, "aud": audience, "exp": int(now) + ttl_s, "iat": int(now)},
                  claims)
    body = {k: v for k, v in body.items() if v is not DROP}
    return mint(signer, body, kid=kid, typ=typ, **dict(header or {}))


def jwt_svid_bundle(trust_domain: str, *keys: TestKey | tuple[str, Mapping[str, Any]],
                    now: float):
    """A `TrustBundle` for `trust_domain` with a throw-away X.509 root and the given JWT
    authorities (TestKeys by their kid, or (kid, raw JWK dict) pairs)."""
    from proxy.core.spiffe import TrustBundle

    jwt: dict[str, Mapping[str, Any]] = {}
    for k in keys:
        if isinstance(k, TestKey):
            jwt[k.kid] = {"use": "jwt-svid", **k.public_jwk(with_alg=False)}
        else:
            jwt[k[0]] = {"use": "jwt-svid", "kid": k[0], **k[1]}
    return TrustBundle(trust_domain, (_root_cert(trust_domain, now),), jwt)


@functools.lru_cache(maxsize=None)
def _root_cert(trust_domain: str, now: float):
    from proxy.dev.ca import DevCA

    return DevCA.create(trust_domain, now=now).cert
