"""A throw-away SPIFFE certificate authority for the demo, the tests and the README.

Rules:
- Tooling, not core: this module may read the clock (when `now` is not given) and write files.
  It is never imported by `proxy.core` or by the serving path.
- A CA certificate is an X.509-SVID signing certificate (X509-SVID.md sections 3.2, 4.1, 4.3):
  cA true, keyUsage keyCertSign + cRLSign (critical), URI SAN `spiffe://<trust domain>` (no path).
- A leaf is issued with the X509-SVID.md section 4 shape by default: one URI SAN, cA false,
  keyUsage digitalSignature (critical), EKU serverAuth + clientAuth, plus DNS SAN `localhost` and
  IP SAN 127.0.0.1 so that curl can also verify a sidecar using it. Every knob can be turned off
  or bent so the tests can build the broken certificates the verifier must refuse; `spiffe_id`
  itself is checked, deliberately bad URIs go in `extra_uris`.
- Validity starts `BACKDATE_S` before `now` (clock skew between hosts), unless `not_before`.
- Private keys are written 0600 as unencrypted PKCS#8 PEM and are never printed.
- Files use the spiffe-helper layout: `svid.pem` (leaf + intermediates), `svid_key.pem`,
  `svid_bundle.pem`; a CA directory holds `ca.pem` (this CA, then its parents) and `ca.key`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain

BACKDATE_S = 60
KEY_TYPES = ("ec", "rsa", "ed25519")
_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}

PrivateKey = Any  # ec / rsa / ed25519 private key


def new_key(key_type: str = "ec") -> PrivateKey:
    """A fresh private key: "ec" (P-256), "rsa" (2048) or "ed25519"."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _time(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), tz=dt.timezone.utc)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Write `data` to `path`; `secret` files are created 0600 (and narrowed if they existed)."""
    if secret:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file already existed with wider permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False,
                         key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
                         encipher_only=False, decipher_only=False)


class DevCA:
    """A CA of one trust domain: a root (`parent` None) or an intermediate. `key` is None for a
    parent loaded from disk (only the CA whose key was written can issue)."""

    def __init__(self, trust_domain: str, key: PrivateKey | None, cert: x509.Certificate,
                 parent: DevCA | None = None) -> None:
        self.trust_domain = parse_trust_domain(trust_domain)
        self.key = key
        self.cert = cert
        self.parent = parent

    def __repr__(self) -> str:
        kind = "intermediate" if self.parent else "root"
        return f"DevCA({self.trust_domain!r}, {kind}, {self.cert.subject.rfc4514_string()!r})"

    # -- hierarchy -----------------------------------------------------------------------------

    @property
    def root(self) -> DevCA:
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its parents' up to, not including, the root."""
        out, ca = [], self
        while ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return tuple(out)

    def _signing_key(self) -> PrivateKey:
        if self.key is None:
            raise ValueError("this CA was loaded without its private key and cannot issue")
        return self.key

    def _builder(self, subject: x509.Name, public_key: Any, not_before: float,
                 not_after: float) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_time(not_before))
                .not_valid_after(_time(not_after))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._signing_key().public_key()), False))

    @classmethod
    def create(cls, trust_domain: str, *, now: float | None = None, ttl_s: int = 30 * 86400,
               key_type: str = "ec", common_name: str | None = None) -> DevCA:
        """A self-signed root CA for `trust_domain`."""
        parse_trust_domain(trust_domain)
        now = time.time() if now is None else now
        key = new_key(key_type)
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portcullis dev"),
            x509.NameAttribute(NameOID.COMMON_NAME,
                               common_name or f"{trust_domain} root"[:64]),
        ])
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_time(now - BACKDATE_S))
                .not_valid_after(_time(now + ttl_s))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
                .sign(key, _hash_for(key)))
        return cls(trust_domain, key, cert)

    def intermediate(self, *, now: float | None = None, ttl_s: int = 7 * 86400,
                     path_length: int | None = None, key_type: str = "ec",
                     common_name: str | None = None, is_ca: bool = True,
                     key_cert_sign: bool = True,
                     permitted_uri_domains: Sequence[str] | None = None) -> DevCA:
        """An intermediate CA signed by this CA. `is_ca` / `key_cert_sign` False make the broken
        "intermediates" the verifier must refuse; `permitted_uri_domains` adds a critical URI
        name constraint (X509-SVID.md section 4.2)."""
        now = time.time() if now is None else now
        key = new_key(key_type)
        depth = len(self.chain()) + 1
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portcullis dev"),
            x509.NameAttribute(NameOID.COMMON_NAME,
                               common_name or f"{self.trust_domain} intermediate {depth}"[:64]),
        ])
        builder = (self._builder(name, key.public_key(), now - BACKDATE_S, now + ttl_s)
                   .add_extension(x509.BasicConstraints(
                       ca=is_ca, path_length=path_length if is_ca else None), True)
                   .add_extension(_key_usage(key_cert_sign=key_cert_sign, crl_sign=key_cert_sign,
                                             digital_signature=not key_cert_sign), True)
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]), False))
        if permitted_uri_domains is not None:
            builder = builder.add_extension(x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(d)
                                    for d in permitted_uri_domains],
                excluded_subtrees=None), True)
        cert = builder.sign(self._signing_key(), _hash_for(self._signing_key()))
        return DevCA(self.trust_domain, key, cert, parent=self)

    # -- leaves --------------------------------------------------------------------------------

    def issue_svid(self, spiffe_id: str | None, *, now: float | None = None, ttl_s: int = 3600,
                   not_before: float | None = None, key_type: str = "ec", is_ca: bool = False,
                   digital_signature: bool = True, key_cert_sign: bool = False,
                   crl_sign: bool = False, key_usage: bool = True,
                   eku: tuple[str, ...] | None = ("server", "client"),
                   extra_uris: Iterable[str] = (), dns_names: Iterable[str] = ("localhost",),
                   ip_addresses: Iterable[str] = ("127.0.0.1",)) -> DevSvid:
        """An X.509-SVID for `spiffe_id` (checked; None for no SPIFFE URI SAN at all).

        `eku` names are "server" / "client" or dotted OIDs; None leaves the extension out.
        `not_before` overrides the start of validity; the end is always `now + ttl_s`.
        """
        if spiffe_id is not None:
            parse_spiffe_id(spiffe_id)
        now = time.time() if now is None else now
        key = new_key(key_type)
        start = now - BACKDATE_S if not_before is None else not_before
        uris = ([spiffe_id] if spiffe_id is not None else []) + list(extra_uris)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portcullis dev")]
        if spiffe_id is not None and len(spiffe_id) <= 64:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id))
        builder = (self._builder(x509.Name(attrs), key.public_key(), start, now + ttl_s)
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True))
        if key_usage:
            builder = builder.add_extension(_key_usage(
                digital_signature=digital_signature, key_cert_sign=key_cert_sign,
                crl_sign=crl_sign, key_encipherment=isinstance(key, rsa.RSAPrivateKey)), True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [_EKU[e] if e in _EKU else x509.ObjectIdentifier(e) for e in eku]), False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self._signing_key(), _hash_for(self._signing_key()))
        return DevSvid(spiffe_id, key, cert, self.chain(), self.bundle_pem())

    # -- files ---------------------------------------------------------------------------------

    def bundle_pem(self) -> bytes:
        """The root certificate of this CA's hierarchy, PEM: the trust bundle for its domain."""
        return _cert_pem(self.root.cert)

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write `ca.pem` (this CA, then its parents up to the root) and `ca.key` (0600)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        certs, ca = [], self
        while ca is not None:
            certs.append(_cert_pem(ca.cert))
            ca = ca.parent
        return {
            "cert": write_file(out / "ca.pem", b"".join(certs)),
            "key": write_file(out / "ca.key", _key_pem(self._signing_key()), secret=True),
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DevCA:
        """Read a CA written by `write`. Raises OSError or ValueError with a clear message."""
        base = Path(directory)
        certs = x509.load_pem_x509_certificates((base / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((base / "ca.key").read_bytes(), password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
                != certs[0].public_key().public_bytes(serialization.Encoding.DER, spki)):
            raise ValueError(f"{base / 'ca.key'} does not match the certificate in "
                             f"{base / 'ca.pem'}")
        trust_domain = _trust_domain_of(certs[0])
        parent: DevCA | None = None
        for cert in reversed(certs[1:]):
            parent = cls(trust_domain, None, cert, parent)
        return cls(trust_domain, key, certs[0], parent)


def _trust_domain_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri.startswith("spiffe://"):
            return parse_spiffe_id(uri).trust_domain
    raise ValueError("CA certificate has no spiffe:// URI SAN naming its trust domain")


class DevSvid:
    """A leaf SVID with its key, the intermediates between it and the root (issuer first, root
    excluded) and the root bundle of its hierarchy."""

    def __init__(self, spiffe_id: str | None, key: PrivateKey, cert: x509.Certificate,
                 chain: tuple[x509.Certificate, ...], bundle: bytes) -> None:
        self.spiffe_id = spiffe_id
        self.key = key
        self.cert = cert
        self.chain = chain
        self.bundle = bundle

    def __repr__(self) -> str:
        return f"DevSvid({self.spiffe_id!r})"

    def cert_pem(self) -> bytes:
        """Leaf then intermediates, PEM (what a server presents)."""
        return b"".join(_cert_pem(c) for c in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def chain_der(self) -> tuple[bytes, ...]:
        """Leaf then intermediates, DER: what a TLS peer presents (for `verify_svid_chain`)."""
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in (self.cert, *self.chain))

    def write(self, directory: str | os.PathLike[str],
              bundle_pem: bytes | None = None) -> dict[str, Path]:
        """spiffe-helper layout: svid.pem (leaf + chain), svid_key.pem (0600), svid_bundle.pem
        (`bundle_pem`, by default the root of the issuing hierarchy)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        return {
            "cert": write_file(out / "svid.pem", self.cert_pem()),
            "key": write_file(out / "svid_key.pem", self.key_pem(), secret=True),
            "bundle": write_file(out / "svid_bundle.pem",
                             self.bundle if bundle_pem is None else bundle_pem),
        }


def _b64url_uint(n: int, size: int | None = None) -> str:
    raw = n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_jwk(public_key: Any) -> dict[str, str]:
    """The RFC 7517/7518/8037 public JWK members of an EC, RSA or Ed25519 public key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        size = (public_key.curve.key_size + 7) // 8
        nums = public_key.public_numbers()
        return {"kty": "EC", "crv": crv[public_key.curve.name],
                "x": _b64url_uint(nums.x, size), "y": _b64url_uint(nums.y, size)}
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(nums.n), "e": _b64url_uint(nums.e)}
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519",
                "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")}
    raise ValueError(f"unsupported key type {type(public_key).__name__}")


def write_spiffe_bundle_json(cas: Sequence[DevCA], *, sequence: int = 1,
                             refresh_hint_s: int = 300,
                             jwt_keys: Mapping[str, Any] | None = None) -> bytes:
    """A SPIFFE bundle (JWK Set, bundle spec section 4) holding the root of every CA given, all of
    one trust domain, plus optional JWT-SVID public keys by kid (X509-SVID.md section 6.1)."""
    if not cas:
        raise ValueError("a SPIFFE bundle needs at least one CA")
    domains = {ca.trust_domain for ca in cas}
    if len(domains) != 1:
        raise ValueError(f"a SPIFFE bundle is for one trust domain, got {sorted(domains)}")
    keys: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    for ca in cas:
        root = ca.root.cert
        der = root.public_bytes(serialization.Encoding.DER)
        if der in seen:
            continue
        seen.add(der)
        keys.append({"use": "x509-svid", **public_jwk(root.public_key()),
                     "x5c": [base64.b64encode(der).decode("ascii")]})
    for kid, public_key in (jwt_keys or {}).items():
        keys.append({"use": "jwt-svid", "kid": kid, **public_jwk(public_key)})
    doc = {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint_s}
    return json.dumps(doc, indent=2, sort_keys=True).encode("ascii") + b"\n"


def generate_ed25519_keypair() -> tuple[bytes, bytes]:
    """(private key as PKCS#8 PEM, public key as SubjectPublicKeyInfo PEM), for audit signing."""
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return _key_pem(key), public
