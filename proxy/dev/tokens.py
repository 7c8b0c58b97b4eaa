"""A throw-away OAuth authorization server for the demo, the tests and the README: issuer key
pairs and their JWKS, JWT access tokens (RFC 9068) and DPoP proof keys and proofs (RFC 9449),
shaped exactly as `proxy.core.tokens` / `proxy.core.dpop` verify them.

Rules:
- Tooling, not core: this module may read the clock (when `now` is not given) and write files.
  It is never imported by `proxy.core` or by the serving path, and it signs with `cryptography`
  directly (no JWT library). ECDSA signatures are the raw R||S of RFC 7518 section 3.4, every
  part is base64url without padding (`proxy.core.jose.b64url_encode`).
- Keys: EC P-256 (ES256, the default), P-384 (ES384), P-521 (ES512), Ed25519 (EdDSA) and RSA
  2048 (RS256/384/512, PS256/384/512). The algorithm of a key read from disk follows from its
  type (EC curve -> ESxxx, Ed25519 -> EdDSA, RSA -> RS256 unless another RS/PS algorithm is asked
  for); an algorithm that does not fit the key is an error.
- Private keys are written 0600 as unencrypted PKCS#8 PEM and are never printed. The issuer's
  public key goes into a JWK Set (RFC 7517 section 5) with `kid`, `alg` and `use: sig`; the
  default `kid` is the key's RFC 7638 thumbprint.
- Access tokens: header `{"alg", "kid", "typ": "at+jwt"}`; claims `iss`, `aud` (a string, or an
  array for several audiences), `sub`, `iat` = `nbf` = now, `exp` = now + ttl, a random `jti`,
  and the optional `client_id`, `scope`, `acr`, `amr`, `auth_time`, `act` (RFC 8693 4.1: nested,
  the CURRENT actor first in `actors`, so it is the outermost `act`), `authorization_details`
  (RFC 9396: an array of objects with a string `type`) and `cnf` (`jkt`, RFC 9449 6.1, or
  `x5t#S256`, RFC 8705 3.1: base64url SHA-256 of the client certificate's DER). `extra` claims
  are applied last and may replace any of these (to try what the sidecar refuses).
- DPoP proofs: header `{"typ": "dpop+jwt", "alg", "jwk"}` with the PUBLIC key only; claims a
  random `jti`, `htm`, `htu` (the URL without query and fragment, RFC 9449 4.2), `iat`, `ath`
  (base64url SHA-256 of the access token, when one is given) and `nonce` (when given).
Every bad input raises `InvalidValue` (or `OSError` for files) with a short clear reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from proxy.core.dpop import ath as ath_of
from proxy.core.jose import ASYMMETRIC_ALGS, b64url_decode, b64url_encode, thumbprint
from proxy.dev.ca import public_jwk, write_file
from proxy.errors import InvalidValue

DEFAULT_ALG = "ES256"
DEFAULT_TTL_S = 300
TOKEN_TYP = "at+jwt"
PROOF_TYP = "dpop+jwt"
RSA_BITS = 2048
#: every algorithm a key can be made for / sign with, in a stable order for help texts
ALGORITHMS = ("ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512",
              "PS256", "PS384", "PS512")

_EC_ALGS = {"ES256": (ec.SECP256R1, 32), "ES384": (ec.SECP384R1, 48), "ES512": (ec.SECP521R1, 66)}
_CURVE_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
# RFC 9110 section 5.6.2: a method is a token
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")

PrivateKey = Any  # ec / rsa / ed25519 private key


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _check_alg(alg: str) -> str:
    if alg not in ASYMMETRIC_ALGS:
        raise InvalidValue(f"algorithm must be one of {', '.join(ALGORITHMS)}", str(alg))
    return alg


def new_signing_key(alg: str = DEFAULT_ALG) -> PrivateKey:
    """A fresh private key for `alg`."""
    _check_alg(alg)
    if alg in _EC_ALGS:
        return ec.generate_private_key(_EC_ALGS[alg][0]())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def alg_for_key(key: PrivateKey, alg: str | None = None) -> str:
    """The JWS algorithm for `key`: `alg` when given and it fits the key, else the key's own
    (EC curve -> ESxxx, Ed25519 -> EdDSA, RSA -> RS256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        own = _CURVE_ALG.get(key.curve.name)
        if own is None:
            raise InvalidValue("unsupported EC curve", key.curve.name)
        fits: tuple[str, ...] = (own,)
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        own, fits = "EdDSA", ("EdDSA",)
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_BITS:
            raise InvalidValue(f"RSA key shorter than {RSA_BITS} bits")
        own, fits = "RS256", tuple(a for a in ALGORITHMS if a[:2] in ("RS", "PS"))
    else:
        raise InvalidValue("unsupported key type (EC P-256/384/521, Ed25519 or RSA)",
                           type(key).__name__)
    if alg is None:
        return own
    _check_alg(alg)
    if alg not in fits:
        raise InvalidValue(f"algorithm {alg} does not fit this key (use {' or '.join(fits)})")
    return alg


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> Path:
    """Write `key` as unencrypted PKCS#8 PEM, 0600 (narrowed if the file existed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_file(out, private_key_pem(key), secret=True)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an unencrypted PEM private key of a supported type. OSError / InvalidValue."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidValue(f"{path}: the private key is encrypted (use an unencrypted PEM)") \
            from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidValue(f"{path}: not a PEM private key") from None
    try:
        alg_for_key(key)  # refuses unsupported key types and short RSA keys
    except InvalidValue as exc:
        raise InvalidValue(f"{path}: {exc}") from None
    return key


def public_key_jwk(key: PrivateKey) -> dict[str, str]:
    """The public JWK members (RFC 7517/7518/8037) of `key` (never a private member)."""
    return dict(public_jwk(key.public_key()))


def jwk_thumbprint(key: PrivateKey) -> str:
    """RFC 7638 SHA-256 thumbprint of the public key, base64url (a DPoP `jkt`)."""
    return thumbprint(public_key_jwk(key))


def issuer_jwks(key: PrivateKey, *, kid: str, alg: str) -> dict[str, Any]:
    """A JWK Set holding the issuer's public key with `kid`, `alg` and `use: sig`."""
    jwk: dict[str, Any] = public_key_jwk(key)
    jwk.update(kid=kid, alg=alg_for_key(key, alg), use="sig")
    return {"keys": [jwk]}


def create_issuer(out: str | os.PathLike[str], *, alg: str = DEFAULT_ALG,
                  kid: str | None = None) -> dict[str, Any]:
    """Write `issuer.key` (0600) and `jwks.json` into `out`. Returns their paths, the kid and
    the algorithm."""
    _check_alg(alg)
    if kid is not None and not kid:
        raise InvalidValue("kid must not be empty")
    key = new_signing_key(alg)
    kid = kid or jwk_thumbprint(key)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(issuer_jwks(key, kid=kid, alg=alg), indent=2, sort_keys=True) + "\n"
    return {"key": write_private_key(directory / "issuer.key", key),
            "jwks": write_file(directory / "jwks.json", doc.encode("ascii")),
            "kid": kid, "alg": alg}


# --------------------------------------------------------------------------------------------
# JWS
# --------------------------------------------------------------------------------------------


def sign(key: PrivateKey, alg: str, data: bytes) -> bytes:
    """The JWS signature of `data` under `alg` (RFC 7518 section 3; ECDSA as raw R||S)."""
    alg = alg_for_key(key, alg)
    if alg in _EC_ALGS:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_HASHES[alg[2:]]())))
        size = _EC_ALGS[alg][1]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg == "EdDSA":
        return key.sign(data)
    h = _HASHES[alg[2:]]
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), h())
    return key.sign(data, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size), h())


def _b64json(obj: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
                         .encode("utf-8"))


def compact_jws(key: PrivateKey, header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """A compact JWS (RFC 7515 7.1) of exactly this header (its `alg` signs) and payload."""
    signing_input = f"{_b64json(header)}.{_b64json(payload)}"
    signature = sign(key, header["alg"], signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(signature)}"


# --------------------------------------------------------------------------------------------
# Access tokens
# --------------------------------------------------------------------------------------------


def cert_thumbprint(path: str | os.PathLike[str]) -> str:
    """RFC 8705 3.1 `x5t#S256` of a certificate file (PEM: its first certificate, the leaf of a
    chain; or DER): base64url SHA-256 of the DER encoding."""
    data = Path(path).read_bytes()
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificates(data)[0]
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise InvalidValue(f"{path}: not a PEM or DER certificate") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return b64url_encode(hashlib.sha256(der).digest())


def _check_sha256(value: str, what: str) -> str:
    """`value` if it is a base64url SHA-256 in its one canonical 43-character spelling."""
    raw = None
    if isinstance(value, str) and len(value) == 43:
        try:
            raw = b64url_decode(value)
        except InvalidValue:
            raw = None
    if raw is None or len(raw) != 32 or b64url_encode(raw) != value:
        raise InvalidValue(f"{what} must be a base64url SHA-256 (43 characters)", str(value))
    return value


def act_chain(actors: Sequence[str]) -> dict[str, Any] | None:
    """RFC 8693 4.1 `act` for `actors`, current actor first: the first is the outermost `act`,
    each later one nested inside the one before."""
    node: dict[str, Any] | None = None
    for sub in reversed(list(actors)):
        if not isinstance(sub, str) or not sub:
            raise InvalidValue("an actor is a non-empty string")
        node = {"sub": sub} if node is None else {"sub": sub, "act": node}
    return node


def parse_authorization_details(text: str) -> list[dict[str, Any]]:
    """RFC 9396 `authorization_details` from JSON text: an array of objects with a string `type`
    (a single object is taken as an array of one)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidValue(f"authorization_details is not JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(d, dict) and isinstance(d.get("type"), str) and d["type"] for d in value):
        raise InvalidValue("authorization_details must be a JSON array of objects with a "
                           "string type")
    return value


def parse_claim(text: str, *, as_json: bool) -> tuple[str, Any]:
    """`name=value` (a string value) or, with `as_json`, `name=<JSON>`."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidValue("a claim is name=value", text)
    if not as_json:
        return name, value
    try:
        return name, json.loads(value)
    except ValueError:
        raise InvalidValue(f"claim {name} is not JSON", value) from None


def mint_access_token(key: PrivateKey, *, kid: str, iss: str, aud: str | Sequence[str],
                      sub: str, alg: str | None = None, now: float | None = None,
                      ttl_s: int = DEFAULT_TTL_S, jti: str | None = None,
                      client_id: str | None = None, scope: str | Sequence[str] | None = None,
                      acr: str | None = None, amr: Sequence[str] = (),
                      auth_time: int | None = None, actors: Sequence[str] = (),
                      authorization_details: Sequence[Mapping[str, Any]] | None = None,
                      cnf_jkt: str | None = None, cnf_x5t_s256: str | None = None,
                      extra: Mapping[str, Any] | None = None, typ: str = TOKEN_TYP) -> str:
    """A signed JWT access token (RFC 9068; module docstring)."""
    alg = alg_for_key(key, alg)
    for name, value in (("kid", kid), ("iss", iss), ("sub", sub)):
        if not isinstance(value, str) or not value:
            raise InvalidValue(f"{name} must be a non-empty string")
    audiences = [aud] if isinstance(aud, str) else list(aud)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise InvalidValue("aud must be one or more non-empty strings")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
        raise InvalidValue("ttl must be a positive number of seconds")
    now_i = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": iss, "sub": sub, "aud": audiences[0] if len(audiences) == 1 else audiences,
        "iat": now_i, "nbf": now_i, "exp": now_i + ttl_s,
        "jti": jti or secrets.token_urlsafe(16),
    }
    if client_id is not None:
        claims["client_id"] = client_id
    if scope is not None:
        scopes = scope.split() if isinstance(scope, str) else list(scope)
        for s in scopes:
            if not _SCOPE_TOKEN.fullmatch(s):
                raise InvalidValue("a scope is an RFC 6749 scope-token", s)
        claims["scope"] = " ".join(scopes)
    if acr is not None:
        claims["acr"] = acr
    if amr:
        claims["amr"] = list(amr)
    if auth_time is not None:
        if isinstance(auth_time, bool) or not isinstance(auth_time, int):
            raise InvalidValue("auth_time must be an integer (seconds since the epoch)")
        claims["auth_time"] = auth_time
    act = act_chain(actors)
    if act is not None:
        claims["act"] = act
    if authorization_details is not None:
        claims["authorization_details"] = [dict(d) for d in authorization_details]
    cnf: dict[str, str] = {}
    if cnf_jkt is not None:
        cnf["jkt"] = _check_sha256(cnf_jkt, "cnf jkt")
    if cnf_x5t_s256 is not None:
        cnf["x5t#S256"] = _check_sha256(cnf_x5t_s256, "cnf x5t#S256")
    if cnf:
        claims["cnf"] = cnf
    claims.update(extra or {})
    return compact_jws(key, {"alg": alg, "kid": kid, "typ": typ}, claims)


# --------------------------------------------------------------------------------------------
# DPoP
# --------------------------------------------------------------------------------------------


def create_dpop_key(path: str | os.PathLike[str], *, alg: str = DEFAULT_ALG) -> tuple[Path, str]:
    """Write a new DPoP proof key (0600) to `path`; return the path and its jkt."""
    key = new_signing_key(alg)
    return write_private_key(path, key), jwk_thumbprint(key)


def htu_of(url: str) -> str:
    """The `htu` of a request URL: an http(s) URL without query and fragment (RFC 9449 4.2)."""
    if not isinstance(url, str) or any(c.isspace() for c in url) or not url.isascii():
        raise InvalidValue("the URL must be ASCII without spaces (percent-encode the rest)", url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidValue("not a valid URL", url) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidValue("the URL must be http:// or https:// with a host", url)
    if "@" in parts.netloc:
        raise InvalidValue("the URL must not carry userinfo (RFC 9110 4.2.4)", url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


def mint_dpop_proof(key: PrivateKey, *, method: str, url: str, access_token: str | None = None,
                    nonce: str | None = None, alg: str | None = None, now: float | None = None,
                    jti: str | None = None) -> str:
    """A DPoP proof JWT for one request (module docstring)."""
    alg = alg_for_key(key, alg)
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise InvalidValue("the method must be an HTTP method token (e.g. GET)", str(method))
    claims: dict[str, Any] = {"jti": jti or secrets.token_urlsafe(16), "htm": method,
                              "htu": htu_of(url), "iat": int(time.time() if now is None else now)}
    if access_token is not None:
        try:
            claims["ath"] = ath_of(access_token)
        except InvalidValue:
            raise InvalidValue("the access token must be ASCII text") from None
        if not access_token or any(c.isspace() for c in access_token):
            raise InvalidValue("the access token must be one non-empty word (no 'DPoP ' prefix)")
    if nonce is not None:
        if not nonce:
            raise InvalidValue("the nonce must not be empty")
        claims["nonce"] = nonce
    header = {"typ": PROOF_TYP, "alg": alg, "jwk": public_key_jwk(key)}
    return compact_jws(key, header, claims)


