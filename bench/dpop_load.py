"""Credentials for the full-pipeline benchmark target `portcullis-dpop`: an issuer key and JWKS,
one DPoP-bound access token (verified once, then served from the sidecar's token cache), and a file
of fresh DPoP proofs, one per request (each proof has its own jti: the sidecar refuses replays, so a
proof can never be reused), which bench/wrk_dpop.lua and bench/openloop.py send in turn.

Signing a proof here costs the load generator ~50-100 us; it is done before the run, not during it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://idp.bench.example"
AUDIENCE = "https://portcullis.bench.example"
SUBJECT = "alice"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _es256(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict:
    n = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": _b64(n.x.to_bytes(32, "big")),
            "y": _b64(n.y.to_bytes(32, "big"))}


def _jws(key, header: dict, payload: dict) -> str:
    si = f"{_b64json(header)}.{_b64json(payload)}"
    return f"{si}.{_es256(key, si.encode())}"


class Credentials:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.issuer_key = ec.generate_private_key(ec.SECP256R1())
        self.proof_key = ec.generate_private_key(ec.SECP256R1())
        jwk = _public_jwk(self.issuer_key)
        (directory / "jwks.json").write_text(json.dumps(
            {"keys": [{**jwk, "kid": "bench-1", "alg": "ES256", "use": "sig"}]}))
        self.proof_jwk = _public_jwk(self.proof_key)
        canon = json.dumps({k: self.proof_jwk[k] for k in ("crv", "kty", "x", "y")},
                           separators=(",", ":"), sort_keys=True)
        self.jkt = _b64(hashlib.sha256(canon.encode()).digest())
        now = int(time.time())
        self.token = _jws(self.issuer_key, {"alg": "ES256", "kid": "bench-1", "typ": "at+jwt"},
                          {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "exp": now + 3600,
                           "iat": now, "client_id": "bench", "cnf": {"jkt": self.jkt}})
        self.ath = _b64(hashlib.sha256(self.token.encode()).digest())

    @property
    def jwks_path(self) -> Path:
        return self.dir / "jwks.json"

    def proofs(self, htu: str, n: int, path: Path) -> Path:
        """`n` fresh proofs for GET `htu`, one per line."""
        header = _b64json({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.proof_jwk})
        now = int(time.time())
        with open(path, "w") as f:
            for _ in range(n):
                payload = _b64json({"jti": _b64(os.urandom(12)), "htm": "GET", "htu": htu,
                                    "iat": now, "ath": self.ath})
                si = f"{header}.{payload}"
                f.write(f"{si}.{_es256(self.proof_key, si.encode())}\n")
        return path
