"""JOSE for the decision core: JWK parsing, RFC 7638 thumbprints, JWS compact parsing and
signature verification on `cryptography` primitives, and algorithm allow-lists.

Rules:
- Only asymmetric algorithms exist here: ES256/ES384/ES512 (RFC 7518 3.4), EdDSA with Ed25519
  (RFC 8037), RS256/384/512 (RFC 7518 3.3, keys >= 2048 bits) and PS256/384/512 (RFC 7518 3.5).
  `none` and every HMAC algorithm are refused before any key is looked at, so an HMAC "signed" with
  a public key (algorithm confusion) can never verify.
- The algorithm must match the key type and curve (ES256 needs EC P-256, EdDSA needs OKP Ed25519...);
  a JWK's own `alg`, when present, must equal the JWS `alg`.
- ECDSA signatures are the raw R||S of RFC 7518 3.4: exactly 2 * coordinate size bytes, each of R and
  S in [1, n-1] (zero-value signatures are refused outright, whatever the library would say).
- Public JWKs only: any private member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`) is an error.
- JWS compact serialization (RFC 7515 7.1): exactly three base64url parts without padding; the
  header and the payload are JSON objects; duplicate member names are refused (RFC 7515 5.2 allows
  that choice; a parser that took the last one could disagree with another); `crit` is refused since
  no extension is understood (RFC 7515 4.1.11).
- Thumbprints (RFC 7638 section 3): the required members only, in lexicographic order, no whitespace,
  SHA-256, base64url without padding.
Every failure raises `InvalidValue` with a short stable reason; callers map it to their error code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from proxy.errors import InvalidValue

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_ECDSA = {alg: ec.ECDSA(_HASHES[alg[2:]]()) for alg in ("ES256", "ES384", "ES512")}  # immutable
_CURVES = {"P-256": (ec.SECP256R1, 32, "ES256"), "P-384": (ec.SECP384R1, 48, "ES384"),
           "P-521": (ec.SECP521R1, 66, "ES512")}
_CURVE_ORDER = {
    "P-256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "P-384": int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16),
    "P-521": int("01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16),
}
ASYMMETRIC_ALGS = frozenset({"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512",
                             "PS256", "PS384", "PS512"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_VALUE = {c: i for i, c in enumerate(_B64_ALPHABET)}
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_PAD = (b"", b"", b"==", b"=")  # by len % 4 (1 is never valid)
_UNUSED_BITS = (0, 0, 0x0F, 0x03)  # low bits of the last character that carry no data
MIN_RSA_BITS = 2048


def b64url_decode(part: str | bytes) -> bytes:
    """Strict base64url without padding (RFC 7515 section 2): only the 64 characters of the
    URL-safe alphabet (no padding, whitespace or `+`/`/`), a length that is not 1 modulo 4, and
    the canonical spelling (RFC 4648 section 3.5: the unused low bits of the last character are
    zero; otherwise one token or proof would have two fingerprints)."""
    try:
        raw = part.encode("ascii") if isinstance(part, str) else bytes(part)
    except UnicodeEncodeError:
        raise InvalidValue("not base64url") from None
    rem = len(raw) % 4
    if rem == 1 or raw.translate(None, _B64_ALPHABET):  # what is left is outside the alphabet
        raise InvalidValue("not base64url")
    if rem and _B64_VALUE[raw[-1]] & _UNUSED_BITS[rem]:
        raise InvalidValue("not canonical base64url")
    try:
        return binascii.a2b_base64(raw.translate(_URLSAFE_TO_STD) + _PAD[rem])
    except (binascii.Error, ValueError):  # pragma: no cover - the checks above admit only valid input
        raise InvalidValue("not base64url") from None


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidValue("duplicate JSON member", k)
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise InvalidValue("NaN and Infinity are not JSON", name)


#: One decoder for every call (`json.loads` with hooks builds a decoder and its scanner per call).
#: Stateless between calls, like the json module's own default decoder.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes (RFC 8259 section 8.1: no BOM, no UTF-16/32 guessing),
    without duplicate members or the non-JSON constants NaN / Infinity."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = _DECODER.decode(text)
    except InvalidValue:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidValue(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise InvalidValue(f"{what} is not a JSON object")
    return obj


def _int_member(jwk: Mapping[str, Any], name: str) -> int:
    v = jwk.get(name)
    if not isinstance(v, str) or not v:
        raise InvalidValue(f"JWK member {name} missing or not a string")
    return int.from_bytes(b64url_decode(v), "big")


@dataclass(frozen=True, slots=True)
class JWK:
    """A parsed public JWK."""

    kty: str
    key: Any  # a cryptography public key
    thumbprint: str  # RFC 7638, base64url SHA-256
    kid: str | None = None
    alg: str | None = None
    use: str | None = None
    crv: str | None = None
    members: Mapping[str, Any] = field(default_factory=dict)

    def algorithms(self) -> frozenset[str]:
        """The JWS algorithms this key can verify."""
        if self.kty == "EC":
            return frozenset({_CURVES[self.crv][2]})  # type: ignore[index]
        if self.kty == "OKP":
            return frozenset({"EdDSA"})
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 section 3.2 JWK thumbprint (SHA-256, base64url)."""
    kty = jwk.get("kty")
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x"),
                "oct": ("k", "kty")}.get(kty) if isinstance(kty, str) else None
    if required is None:
        raise InvalidValue("unsupported JWK kty", str(kty))
    members = {}
    for name in required:
        v = jwk.get(name)
        if not isinstance(v, str):
            raise InvalidValue(f"JWK member {name} missing or not a string")
        members[name] = v
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def parse_jwk(obj: Any) -> JWK:
    """Parse one public JWK (RFC 7517/7518/8037). Raises InvalidValue."""
    if not isinstance(obj, Mapping):
        raise InvalidValue("JWK is not a JSON object")
    for m in _PRIVATE_MEMBERS:
        if m in obj:
            raise InvalidValue(f"JWK has the private member {m!r}")
    kty = obj.get("kty")
    crv = obj.get("crv")
    try:
        if kty == "EC":
            if crv not in _CURVES:
                raise InvalidValue("unsupported EC curve", str(crv))
            curve, size, _alg = _CURVES[crv]
            x, y = b64url_decode(obj.get("x", "") or ""), b64url_decode(obj.get("y", "") or "")
            if len(x) != size or len(y) != size:
                raise InvalidValue("EC coordinates have the wrong length")
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                curve()).public_key()
        elif kty == "OKP":
            if crv != "Ed25519":
                raise InvalidValue("unsupported OKP curve", str(crv))
            x = b64url_decode(obj.get("x", "") or "")
            if len(x) != 32:
                raise InvalidValue("Ed25519 key has the wrong length")
            key = ed25519.Ed25519PublicKey.from_public_bytes(x)
        elif kty == "RSA":
            n, e = _int_member(obj, "n"), _int_member(obj, "e")
            if n.bit_length() < MIN_RSA_BITS:
                raise InvalidValue(f"RSA key shorter than {MIN_RSA_BITS} bits")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        elif kty == "oct":
            raise InvalidValue("symmetric (oct) keys are not accepted")
        else:
            raise InvalidValue("unsupported JWK kty", str(kty))
    except InvalidValue:
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidValue(f"JWK is not a valid public key ({exc})") from None
    alg = obj.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in ASYMMETRIC_ALGS):
        raise InvalidValue("JWK alg is not an accepted asymmetric algorithm", str(alg))
    kid = obj.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidValue("JWK kid is not a string")
    return JWK(kty=kty, key=key, thumbprint=thumbprint(obj), kid=kid, alg=alg, use=obj.get("use"),
               crv=crv, members=MappingProxyType(dict(obj)))


@dataclass(frozen=True, slots=True)
class JWKSet:
    """Verification keys of one issuer. Keys with `use` other than "sig", or of unsupported types,
    are skipped (RFC 7517 section 5: unknown members and key types are ignored)."""

    keys: tuple[JWK, ...]
    by_kid: Mapping[str, tuple[JWK, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, keys: tuple[JWK, ...]) -> "JWKSet":
        by: dict[str, list[JWK]] = {}
        for k in keys:
            if k.kid is not None:
                by.setdefault(k.kid, []).append(k)
        return cls(keys, MappingProxyType({k: tuple(v) for k, v in by.items()}))

    def candidates(self, kid: str | None, alg: str) -> tuple[JWK, ...]:
        """Keys that may verify a JWS with this kid and alg (all keys for the alg without a kid)."""
        pool = self.by_kid.get(kid, ()) if kid is not None else self.keys
        return tuple(k for k in pool if alg in k.algorithms() and (k.alg is None or k.alg == alg))


def parse_jwks(data: bytes | Mapping[str, Any]) -> JWKSet:
    obj = json_object(data, "JWKS") if isinstance(data, (bytes, bytearray)) else data
    raw = obj.get("keys")
    if not isinstance(raw, list):
        raise InvalidValue("JWKS has no keys array")
    keys = []
    for entry in raw:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        try:
            keys.append(parse_jwk(entry))
        except InvalidValue:
            if isinstance(entry, Mapping) and any(m in entry for m in _PRIVATE_MEMBERS):
                raise  # a private key published in a JWKS is a configuration error, not noise
            continue
    if not keys:
        raise InvalidValue("JWKS has no usable signature keys")
    return JWKSet.of(tuple(keys))


@dataclass(frozen=True, slots=True)
class JWS:
    """A parsed (not yet verified) JWS in compact serialization."""

    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return self.header.get("alg")  # type: ignore[return-value]


def parse_jws(token: str, *, max_bytes: int = 16384) -> JWS:
    """Split and decode a compact JWS whose payload is a JSON object (a JWT). Raises InvalidValue."""
    if not isinstance(token, str) or len(token) > max_bytes:
        raise InvalidValue("JWS too large" if isinstance(token, str) else "JWS is not text")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidValue("not a compact JWS (three parts)")
    h64, p64, s64 = parts
    if not h64 or not p64:
        raise InvalidValue("JWS has an empty part")
    header = json_object(b64url_decode(h64), "JWS header")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise InvalidValue("JWS header has no alg")
    if "crit" in header:
        raise InvalidValue("JWS header has crit extensions that are not understood")
    payload = json_object(b64url_decode(p64), "JWS payload")
    signature = b64url_decode(s64) if s64 else b""
    return JWS(header, payload, f"{h64}.{p64}".encode("ascii"), signature)


def check_alg(alg: Any, allowed: frozenset[str]) -> str:
    """The JWS alg, if it is an accepted asymmetric algorithm in `allowed`; else InvalidValue."""
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGS:
        raise InvalidValue("algorithm not accepted", str(alg))
    if alg not in allowed:
        raise InvalidValue("algorithm not allowed here", alg)
    return alg


def verify(jws: JWS, key: JWK, alg: str) -> None:
    """Verify the JWS signature with `key` under `alg`; raise InvalidValue when it does not verify."""
    if alg not in key.algorithms() or (key.alg is not None and key.alg != alg):
        raise InvalidValue("algorithm does not match the key type", alg)
    sig, data = jws.signature, jws.signing_input
    try:
        if alg.startswith("ES"):
            size = _CURVES[key.crv][1]  # type: ignore[index]
            if len(sig) != 2 * size:
                raise InvalidValue("ECDSA signature has the wrong length")
            r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            order = _CURVE_ORDER[key.crv]  # type: ignore[index]
            if not (0 < r < order and 0 < s < order):
                raise InvalidValue("ECDSA signature value out of range")
            key.key.verify(encode_dss_signature(r, s), data, _ECDSA[alg])
        elif alg == "EdDSA":
            key.key.verify(sig, data)
        elif alg.startswith("RS"):
            key.key.verify(sig, data, padding.PKCS1v15(), _HASHES[alg[2:]]())
        elif alg.startswith("PS"):
            h = _HASHES[alg[2:]]
            key.key.verify(sig, data, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size),
                           h())
        else:  # pragma: no cover - check_alg keeps this unreachable
            raise InvalidValue("algorithm not accepted", alg)
    except InvalidSignature:
        raise InvalidValue("signature does not verify") from None
    except (ValueError, TypeError):
        raise InvalidValue("signature does not verify") from None
