"""Mint DPoP proofs (RFC 9449 section 4) for tests, signed with `cryptography` directly (no pyjwt).

    key = ProofKey.generate("ES256")            # also "ES384", "ES512", "EdDSA", "RS256", "PS256"...
    proof = make_proof(key, method="GET", htu="https://api.example.com/x", iat=NOW,
                       access_token="tok")      # adds ath
    make_proof(key, claims={"htm": "POST"}, drop=("jti",), header={"typ": "JWT"}, alg="EdDSA",
               include_private=True, sign_with=other_key, flip_signature=True)

Overrides: `claims` / `header` replace or add members (a value of `DROP` removes one, like `drop=`
and `drop_header=`); `alg` writes the header `alg` without changing the signing key; `jwk`
replaces the whole `jwk` header; `include_private` adds the private members of the key to `jwk`;
`sign_with` signs with another key (its own algorithm) while the header names this one;
`flip_signature` corrupts the signature; `raw_header` / `raw_payload` sign arbitrary bytes.
RSA keys are generated once per process and reused (generation is slow).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from proxy.core.jose import b64url_encode, thumbprint
from proxy.core.dpop import ath as ath_of

DROP = object()
NOW = 1_800_000_000
HTU = "https://api.example.com/orders/42"
_CURVES = {"ES256": (ec.SECP256R1, 32, "P-256", hashes.SHA256),
           "ES384": (ec.SECP384R1, 48, "P-384", hashes.SHA384),
           "ES512": (ec.SECP521R1, 66, "P-521", hashes.SHA512)}
_RSA_CACHE: dict[int, rsa.RSAPrivateKey] = {}


def _b64int(n: int, size: int | None = None) -> str:
    size = size or max(1, (n.bit_length() + 7) // 8)
    return b64url_encode(n.to_bytes(size, "big"))


@dataclass
class ProofKey:
    """A client key pair with its JWS algorithm and JWKs."""

    alg: str
    private: Any

    @classmethod
    def generate(cls, alg: str = "ES256", *, rsa_bits: int = 2048) -> "ProofKey":
        if alg in _CURVES:
            return cls(alg, ec.generate_private_key(_CURVES[alg][0]()))
        if alg == "EdDSA":
            return cls(alg, ed25519.Ed25519PrivateKey.generate())
        if alg[:2] in ("RS", "PS"):
            if rsa_bits not in _RSA_CACHE:
                _RSA_CACHE[rsa_bits] = rsa.generate_private_key(65537, rsa_bits)
            return cls(alg, _RSA_CACHE[rsa_bits])
        raise ValueError(alg)

    @property
    def public_jwk(self) -> dict[str, str]:
        k = self.private
        if isinstance(k, ec.EllipticCurvePrivateKey):
            _, size, crv, _ = _CURVES[self.alg]
            n = k.public_key().public_numbers()
            return {"kty": "EC", "crv": crv, "x": _b64int(n.x, size), "y": _b64int(n.y, size)}
        if isinstance(k, ed25519.Ed25519PrivateKey):
            return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(k.public_key().public_bytes_raw())}
        n = k.public_key().public_numbers()
        return {"kty": "RSA", "n": _b64int(n.n), "e": _b64int(n.e)}

    @property
    def private_jwk(self) -> dict[str, str]:
        k, jwk = self.private, dict(self.public_jwk)
        if isinstance(k, ec.EllipticCurvePrivateKey):
            jwk["d"] = _b64int(k.private_numbers().private_value, _CURVES[self.alg][1])
        elif isinstance(k, ed25519.Ed25519PrivateKey):
            jwk["d"] = b64url_encode(k.private_bytes_raw())
        else:
            p = k.private_numbers()
            jwk.update(d=_b64int(p.d), p=_b64int(p.p), q=_b64int(p.q), dp=_b64int(p.dmp1),
                       dq=_b64int(p.dmq1), qi=_b64int(p.iqmp))
        return jwk

    @property
    def jkt(self) -> str:
        return thumbprint(self.public_jwk)

    def sign(self, data: bytes) -> bytes:
        """A JWS signature (RFC 7518: raw R||S for ECDSA) under this key's algorithm."""
        k = self.private
        if isinstance(k, ec.EllipticCurvePrivateKey):
            _, size, _, h = _CURVES[self.alg]
            r, s = decode_dss_signature(k.sign(data, ec.ECDSA(h())))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if isinstance(k, ed25519.Ed25519PrivateKey):
            return k.sign(data)
        h = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[self.alg[2:]]
        if self.alg.startswith("PS"):
            return k.sign(data, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size), h())
        return k.sign(data, padding.PKCS1v15(), h())


def _apply(base: dict[str, Any], overrides: dict[str, Any] | None, drop: Iterable[str]) -> dict:
    out = dict(base)
    for k, v in (overrides or {}).items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    for k in drop:
        out.pop(k, None)
    return out


def make_proof(key: ProofKey, *, method: str = "GET", htu: str = HTU, iat: Any = NOW,
               jti: str | None = None, access_token: str | None = None, nonce: str | None = None,
               claims: dict[str, Any] | None = None, drop: Iterable[str] = (),
               header: dict[str, Any] | None = None, drop_header: Iterable[str] = (),
               alg: str | None = None, typ: str = "dpop+jwt", jwk: Any = None,
               include_private: bool = False, sign_with: ProofKey | None = None,
               flip_signature: bool = False, raw_header: bytes | None = None,
               raw_payload: bytes | None = None) -> str:
    """A compact DPoP proof JWT; every part can be overridden (module docstring)."""
    payload: dict[str, Any] = {"jti": jti or secrets.token_urlsafe(16), "htm": method, "htu": htu,
                               "iat": iat}
    if access_token is not None:
        payload["ath"] = ath_of(access_token)
    if nonce is not None:
        payload["nonce"] = nonce
    payload = _apply(payload, claims, drop)
    hdr: dict[str, Any] = {"typ": typ, "alg": alg or key.alg,
                           "jwk": jwk if jwk is not None else
                           (key.private_jwk if include_private else key.public_jwk)}
    hdr = _apply(hdr, header, drop_header)
    h64 = b64url_encode(raw_header if raw_header is not None else
                        json.dumps(hdr, separators=(",", ":")).encode())
    p64 = b64url_encode(raw_payload if raw_payload is not None else
                        json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{h64}.{p64}".encode("ascii")
    sig = (sign_with or key).sign(signing_input)
    if flip_signature:
        sig = bytes([sig[0] ^ 0x01]) + sig[1:]
    return f"{h64}.{p64}.{b64url_encode(sig)}"
