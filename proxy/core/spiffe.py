"""SPIFFE IDs, trust bundles and X.509-SVID verification (pure: no I/O, time is `now`).

Implements:
- SPIFFE ID parsing exactly per the SPIFFE ID specification (SPIFFE-ID.md sections 2.1-2.3):
  scheme `spiffe://` in lowercase; trust domain of lowercase letters, digits, `.`, `-`, `_`, at most
  255 characters; path segments of letters, digits, `.`, `-`, `_`; no empty, `.` or `..` segments;
  no trailing slash; no percent-encoding, query, fragment, port or userinfo; at most 2048 bytes.
- Trust bundles (SPIFFE_Trust_Domain_and_Bundle.md sections 3-4, X509-SVID.md section 6): a bundle
  is always held together with the name of the trust domain it is authoritative for. PEM bundles
  are a list of CA certificates; SPIFFE bundles are a JWK Set whose `x509-svid` entries carry
  exactly one CA certificate in `x5c` and whose `jwt-svid` entries carry a `kid`; entries with an
  unknown `use` are ignored (section 4.2.2). Every certificate in a bundle must be a CA.
- X.509-SVID verification for the inbound (client) side, X509-SVID.md sections 2, 3, 4 and 5:
  leaf rules (exactly one URI SAN holding a SPIFFE ID with a non-root path; cA false; keyUsage
  present with digitalSignature and without keyCertSign / cRLSign; an extendedKeyUsage, when
  present, allows clientAuth), then RFC 5280 style path building from the leaf to an authority of
  the bundle of THE LEAF'S trust domain (section 5.2 / bundle spec section 3: a CA trusted for
  domain A never vouches for an ID in domain B). Intermediates must be CAs with keyCertSign and
  respect pathLenConstraint; URI name constraints (section 4.2) are applied to the SPIFFE ID;
  unrecognised critical extensions fail the path; the depth and the search work are bounded;
  every certificate on the path must be valid at `now`.
- Failures raise `PeerIdentityError` with a stable code (see `CODES`). Load-time parsers raise
  `InvalidValue`.
- `verify_peer` memoises one verification per (connection, `TrustStore.version`); on every call the
  validity window of the verified path is re-checked against `now`. Failures that depend on time
  are never memoised.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from proxy.core.model import PeerIdentity, SpiffeId
from proxy.errors import InvalidValue, PeerIdentityError

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_CHARS = 255

#: Most certificates a peer may present (leaf included).
MAX_PRESENTED_CERTS = 16
#: Most certificates on a verified path (leaf and authority included).
MAX_PATH_DEPTH = 8
#: Most signature checks one path search may spend before giving up.
MAX_SIGNATURE_CHECKS = 64

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")

#: Every stable code `verify_svid_chain` / `verify_peer` may raise.
CODES = (
    "peer_certificate_missing",
    "svid_chain_too_long",
    "svid_malformed",
    "svid_no_uri_san",
    "svid_multiple_uri_sans",
    "svid_invalid_spiffe_id",
    "svid_leaf_is_ca",
    "svid_missing_digital_signature",
    "svid_leaf_cert_sign",
    "svid_eku_no_client_auth",
    "svid_unhandled_critical_extension",
    "svid_expired",
    "svid_not_yet_valid",
    "svid_unknown_trust_domain",
    "svid_intermediate_not_ca",
    "svid_path_length_exceeded",
    "svid_name_constraint_violation",
    "svid_path_too_long",
    "svid_untrusted",
)
_TIME_CODES = frozenset({"svid_expired", "svid_not_yet_valid"})

# Extensions this module processes; any other extension marked critical fails the certificate
# (RFC 5280 section 4.2: a certificate-using system MUST reject a certificate with an
# unrecognised critical extension).
_HANDLED_CRITICAL = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.NAME_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
})
_ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
_EKU_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
              ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}
#: JWK key types a SPIFFE bundle entry may have; entries of other types are ignored (4.2.1).
_KNOWN_KTY = frozenset({"EC", "RSA", "OKP"})


# --------------------------------------------------------------------------------------------
# SPIFFE IDs
# --------------------------------------------------------------------------------------------


def parse_trust_domain(name: str) -> str:
    """Validate a bare trust domain name (`example.org`) and return it."""
    if not name:
        raise InvalidValue("trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_CHARS:
        raise InvalidValue("trust domain is longer than 255 characters")
    bad = set(name) - _TD_CHARS
    if bad:
        raise InvalidValue("trust domain has characters other than a-z 0-9 . - _", name)
    return name


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse a SPIFFE ID; raise `InvalidValue` naming the first rule it breaks."""
    if not isinstance(value, str):
        raise InvalidValue("SPIFFE ID must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidValue("SPIFFE ID is longer than 2048 bytes")
    if not value.startswith(SCHEME):
        raise InvalidValue("SPIFFE ID must start with spiffe://", value)
    rest = value[len(SCHEME):]
    slash = rest.find("/")
    td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if not td:
        raise InvalidValue("SPIFFE ID has no trust domain", value)
    if "@" in td:
        raise InvalidValue("SPIFFE ID must not have userinfo", value)
    if ":" in td:
        raise InvalidValue("SPIFFE ID must not have a port", value)
    for ch, what in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
        if ch in rest:
            raise InvalidValue(f"SPIFFE ID must not have a {what}", value)
    try:
        parse_trust_domain(td)
    except InvalidValue as exc:
        raise InvalidValue(exc.reason, value) from None
    if path:
        for seg in path[1:].split("/"):
            if seg == "":
                raise InvalidValue("SPIFFE ID path has an empty segment or a trailing slash", value)
            if seg in (".", ".."):
                raise InvalidValue("SPIFFE ID path has a dot segment", value)
            if not _PATH_CHARS.issuperset(seg):
                raise InvalidValue("SPIFFE ID path has characters other than a-z A-Z 0-9 . - _",
                                   value)
    return SpiffeId(td, path)


# --------------------------------------------------------------------------------------------
# Parsed certificates (internal): every fact the checks need, extracted once
# --------------------------------------------------------------------------------------------


class _Cert:
    """A certificate with the fields the checks use, parsed once. Raises ValueError if the
    certificate or one of its extensions does not parse."""

    __slots__ = ("cert", "der", "subject", "issuer", "not_before", "not_after", "is_ca",
                 "path_len", "key_usage", "eku", "uris", "permitted_uris", "excluded_uris",
                 "unhandled_critical", "self_issued")

    def __init__(self, cert: x509.Certificate, der: bytes | None = None) -> None:
        self.cert = cert
        self.der = der if der is not None else cert.public_bytes(serialization.Encoding.DER)
        self.subject = cert.subject.public_bytes()
        self.issuer = cert.issuer.public_bytes()
        self.self_issued = self.subject == self.issuer
        self.not_before = cert.not_valid_before_utc.timestamp()
        self.not_after = cert.not_valid_after_utc.timestamp()
        self.is_ca = False
        self.path_len: int | None = None
        self.key_usage: x509.KeyUsage | None = None
        self.eku: frozenset[x509.ObjectIdentifier] | None = None
        self.uris: tuple[str, ...] = ()
        self.permitted_uris: tuple[str, ...] | None = None
        self.excluded_uris: tuple[str, ...] = ()
        self.unhandled_critical: tuple[str, ...] = ()
        unhandled = []
        for ext in cert.extensions:  # raises ValueError on a malformed or duplicate extension
            value = ext.value
            if ext.critical and ext.oid not in _HANDLED_CRITICAL:
                unhandled.append(ext.oid.dotted_string)
            if isinstance(value, x509.BasicConstraints):
                self.is_ca = value.ca
                self.path_len = value.path_length
            elif isinstance(value, x509.KeyUsage):
                self.key_usage = value
            elif isinstance(value, x509.ExtendedKeyUsage):
                self.eku = frozenset(value)
            elif isinstance(value, x509.SubjectAlternativeName):
                self.uris = tuple(value.get_values_for_type(x509.UniformResourceIdentifier))
            elif isinstance(value, x509.NameConstraints):
                if value.permitted_subtrees is not None:
                    permitted = tuple(n.value for n in value.permitted_subtrees
                                      if isinstance(n, x509.UniformResourceIdentifier))
                    # RFC 5280 4.2.1.10: a constraint restricts only names of its own type.
                    self.permitted_uris = permitted or None
                if value.excluded_subtrees is not None:
                    self.excluded_uris = tuple(n.value for n in value.excluded_subtrees
                                               if isinstance(n, x509.UniformResourceIdentifier))
        self.unhandled_critical = tuple(unhandled)

    @property
    def can_sign_certs(self) -> bool:
        """cA true, and keyCertSign when a keyUsage extension is present (RFC 5280 4.2.1.3)."""
        return self.is_ca and (self.key_usage is None or self.key_usage.key_cert_sign)

    def validity_problem(self, now: float) -> tuple[str, str] | None:
        if now > self.not_after:
            return "svid_expired", f"certificate expired at {self.not_after:.0f}"
        if now < self.not_before:
            return "svid_not_yet_valid", f"certificate not valid before {self.not_before:.0f}"
        return None


def _parse_der(der: bytes) -> _Cert:
    return _Cert(x509.load_der_x509_certificate(der), der)


def _ca_problem(info: _Cert) -> str | None:
    if not info.is_ca:
        return "not a CA certificate (basicConstraints cA is not true)"
    if not info.can_sign_certs:
        return "CA certificate without keyCertSign"
    return None


# --------------------------------------------------------------------------------------------
# Trust bundles and the trust store
# --------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The authorities of ONE trust domain (bundle spec section 3). Build it with `parse_bundle`.

    Construction validates the trust domain name and pre-parses the X.509 authorities, indexed by
    subject, so verification never re-parses them.
    """

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    refresh_hint_s: int | None = None
    sequence: int | None = None
    _by_subject: Mapping[bytes, tuple[_Cert, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parse_trust_domain(self.trust_domain)
        if not self.x509_authorities:
            raise InvalidValue("trust bundle has no X.509 authorities", self.trust_domain)
        index: dict[bytes, list[_Cert]] = {}
        for cert in self.x509_authorities:
            try:
                info = _Cert(cert)
            except ValueError as exc:
                raise InvalidValue(f"bundle certificate does not parse ({exc})") from None
            index.setdefault(info.subject, []).append(info)
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", _freeze(self.jwt_authorities))
        object.__setattr__(self, "_by_subject",
                           MappingProxyType({k: tuple(v) for k, v in index.items()}))

    def _issuers(self, subject_der: bytes) -> tuple[_Cert, ...]:
        """The authorities whose subject is `subject_der` (pre-parsed, internal)."""
        return self._by_subject.get(subject_der, ())


def _bundle_cert(cert: x509.Certificate, where: str) -> x509.Certificate:
    try:
        problem = _ca_problem(_Cert(cert))
    except ValueError as exc:
        raise InvalidValue(f"{where}: certificate does not parse ({exc})") from None
    if problem:
        raise InvalidValue(f"{where}: {problem}")
    return cert


def _dedupe(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    return tuple(seen.values())


def parse_pem_bundle(trust_domain: str, data: bytes) -> TrustBundle:
    """A PEM file of CA certificates, authoritative for `trust_domain`."""
    parse_trust_domain(trust_domain)
    try:
        certs = x509.load_pem_x509_certificates(bytes(data))
    except ValueError:
        raise InvalidValue("PEM bundle has no parseable certificate") from None
    checked = [_bundle_cert(c, f"certificate [{i}]") for i, c in enumerate(certs)]
    return TrustBundle(trust_domain, _dedupe(checked))


def _optional_uint(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValue(f"SPIFFE bundle {key} must be a non-negative integer")
    return value


def parse_spiffe_bundle(trust_domain: str, data: bytes) -> TrustBundle:
    """A SPIFFE bundle: a JWK Set (bundle spec section 4, X509-SVID.md section 6.2)."""
    parse_trust_domain(trust_domain)
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        raise InvalidValue("SPIFFE bundle is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidValue("SPIFFE bundle must be a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise InvalidValue("SPIFFE bundle must have a keys array (section 4.1.3)")
    sequence = _optional_uint(doc, "spiffe_sequence")
    refresh_hint = _optional_uint(doc, "spiffe_refresh_hint")
    x509_certs: list[x509.Certificate] = []
    jwt: dict[str, Mapping[str, Any]] = {}
    for i, key in enumerate(keys):
        where = f"keys[{i}]"
        if not isinstance(key, dict):
            raise InvalidValue(f"{where} must be a JSON object")
        use = key.get("use")
        if use not in ("x509-svid", "jwt-svid"):
            continue  # unknown or missing `use`: ignore the whole entry (section 4.2.2)
        kty = key.get("kty")
        if not isinstance(kty, str) or not kty:
            raise InvalidValue(f"{where}: kty must be set (section 4.2.1)")
        if kty not in _KNOWN_KTY:
            continue  # unknown key type: ignore the whole entry (section 4.2.1)
        if use == "x509-svid":
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise InvalidValue(f"{where}: x509-svid entry must carry exactly one x5c "
                                   "certificate (X509-SVID section 6.1)")
            try:
                der = base64.b64decode(x5c[0], validate=True)
                cert = x509.load_der_x509_certificate(der)
            except (binascii.Error, ValueError):
                raise InvalidValue(f"{where}: x5c certificate does not parse") from None
            x509_certs.append(_bundle_cert(cert, where))
        else:
            kid = key.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidValue(f"{where}: jwt-svid entry must have a kid")
            if kid in jwt:
                raise InvalidValue(f"{where}: duplicate jwt-svid kid", kid)
            jwt[kid] = key
    if not x509_certs:
        raise InvalidValue("SPIFFE bundle has no x509-svid authorities")
    return TrustBundle(trust_domain, _dedupe(x509_certs), jwt, refresh_hint, sequence)


def parse_bundle(trust_domain: str, data: bytes, fmt: Literal["pem", "spiffe"]) -> TrustBundle:
    """Parse a trust bundle in the named format."""
    if fmt == "pem":
        return parse_pem_bundle(trust_domain, data)
    if fmt == "spiffe":
        return parse_spiffe_bundle(trust_domain, data)
    raise InvalidValue("bundle format must be pem or spiffe", str(fmt))


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Every trust domain this sidecar accepts callers from, with the bundle for each.

    `version` is bumped by the runtime on every reload: verification results are memoised per
    version, so a store with new content MUST carry a new version.
    """

    bundles: Mapping[str, TrustBundle]
    version: int = 0

    def __post_init__(self) -> None:
        for td, bundle in self.bundles.items():
            if td != bundle.trust_domain:
                raise InvalidValue(f"trust store key {td!r} holds the bundle of "
                                   f"{bundle.trust_domain!r}")
        object.__setattr__(self, "bundles", MappingProxyType(dict(self.bundles)))

    @classmethod
    def of(cls, bundles: Iterable[TrustBundle], version: int = 0) -> TrustStore:
        """A store from bundles; two bundles for one trust domain are an error."""
        by_td: dict[str, TrustBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in by_td:
                raise InvalidValue("two bundles for one trust domain", bundle.trust_domain)
            by_td[bundle.trust_domain] = bundle
        return cls(by_td, version)

    def roots_pem(self) -> str:
        """The union of every X.509 authority, PEM (for `SSLContext.load_verify_locations`)."""
        certs = _dedupe(c for b in self.bundles.values() for c in b.x509_authorities)
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


# --------------------------------------------------------------------------------------------
# X.509-SVID verification
# --------------------------------------------------------------------------------------------


def _leaf_identity(leaf: _Cert, purpose: x509.ObjectIdentifier) -> SpiffeId:
    """The leaf rules of X509-SVID.md sections 2, 3.1, 4 and 5.2; `purpose` is the EKU the leaf
    must allow when it has an EKU extension (clientAuth for a caller, serverAuth for a server)."""
    if not leaf.uris:
        raise PeerIdentityError("svid_no_uri_san", "leaf has no URI SAN")
    if len(leaf.uris) > 1:
        raise PeerIdentityError("svid_multiple_uri_sans",
                                f"leaf has {len(leaf.uris)} URI SANs (X509-SVID section 2)")
    try:
        spiffe_id = parse_spiffe_id(leaf.uris[0])
    except InvalidValue as exc:
        raise PeerIdentityError("svid_invalid_spiffe_id", exc.reason) from None
    if not spiffe_id.path:
        raise PeerIdentityError("svid_invalid_spiffe_id",
                                "leaf SPIFFE ID has no path (X509-SVID section 3.1)")
    if leaf.is_ca:
        raise PeerIdentityError("svid_leaf_is_ca", "leaf has basicConstraints cA true")
    ku = leaf.key_usage
    if ku is None or not ku.digital_signature:
        raise PeerIdentityError("svid_missing_digital_signature",
                                "leaf keyUsage must be present with digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise PeerIdentityError("svid_leaf_cert_sign", "leaf keyUsage has keyCertSign or cRLSign")
    if leaf.eku is not None and purpose not in leaf.eku and _ANY_EKU not in leaf.eku:
        code = ("svid_eku_no_client_auth" if purpose == ExtendedKeyUsageOID.CLIENT_AUTH
                else "svid_eku_no_server_auth")
        raise PeerIdentityError(code, "leaf extendedKeyUsage does not allow "
                                + _EKU_NAMES.get(purpose, purpose.dotted_string))
    if leaf.unhandled_critical:
        raise PeerIdentityError("svid_unhandled_critical_extension",
                                "leaf has critical extension " + ", ".join(leaf.unhandled_critical))
    return spiffe_id


def _uri_constraint_matches(host: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10 URI constraints: `host` exact, `.domain` any subdomain."""
    constraint = constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


class _Search:
    """State of one path search: the first reason a real issuer candidate was rejected, whether
    time decided anything, and the remaining signature-check budget."""

    __slots__ = ("reason", "time_sensitive", "budget", "signed")

    def __init__(self) -> None:
        self.reason: tuple[str, str] | None = None
        self.time_sensitive = False
        self.budget = MAX_SIGNATURE_CHECKS
        self.signed: dict[tuple[bytes, bytes], bool] = {}

    def note(self, code: str, detail: str) -> None:
        if code in _TIME_CODES:
            self.time_sensitive = True
        if self.reason is None:
            self.reason = (code, detail)

    def issued_by(self, child: _Cert, issuer: _Cert) -> bool:
        pair = (child.der, issuer.der)
        known = self.signed.get(pair)
        if known is not None:
            return known
        if self.budget <= 0:
            self.note("svid_path_too_long", "path search budget exhausted")
            return False
        self.budget -= 1
        try:
            child.cert.verify_directly_issued_by(issuer.cert)
            ok = True
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            ok = False
        self.signed[pair] = ok
        return ok


def _issuer_problem(issuer: _Cert, path: list[_Cert], spiffe_id: SpiffeId,
                    now: float) -> tuple[str, str] | None:
    """Why `issuer` cannot sit above `path` (leaf first), or None."""
    problem = _ca_problem(issuer)
    if problem:
        return "svid_intermediate_not_ca", problem
    if issuer.unhandled_critical:
        return ("svid_unhandled_critical_extension",
                "CA has critical extension " + ", ".join(issuer.unhandled_critical))
    if issuer.path_len is not None:
        # RFC 5280 6.1.4 (l)/(m): non-self-issued intermediates below this CA.
        below = sum(1 for c in path[1:] if not c.self_issued)
        if below > issuer.path_len:
            return ("svid_path_length_exceeded",
                    f"pathLenConstraint {issuer.path_len} with {below} intermediates below")
    host = spiffe_id.trust_domain
    if issuer.permitted_uris is not None and not any(
            _uri_constraint_matches(host, c) for c in issuer.permitted_uris):
        return "svid_name_constraint_violation", f"{host} outside permitted URI subtrees"
    if any(_uri_constraint_matches(host, c) for c in issuer.excluded_uris):
        return "svid_name_constraint_violation", f"{host} inside excluded URI subtrees"
    return issuer.validity_problem(now)


def _build_path(path: list[_Cert], pool: Sequence[_Cert], bundle: TrustBundle,
                spiffe_id: SpiffeId, now: float, search: _Search) -> list[_Cert] | None:
    """Depth-first search from `path[-1]` up to an authority of `bundle`."""
    current = path[-1]
    for anchor in bundle._issuers(current.issuer):
        if anchor.der == current.der:  # nothing vouches for itself (a leaf in the bundle)
            continue
        if not search.issued_by(current, anchor):
            continue
        problem = _issuer_problem(anchor, path, spiffe_id, now)
        if problem is None:
            return path + [anchor]
        search.note(*problem)
    if len(path) + 1 >= MAX_PATH_DEPTH:
        search.note("svid_path_too_long", f"no authority within {MAX_PATH_DEPTH} certificates")
        return None
    for candidate in pool:
        if candidate.subject != current.issuer or any(candidate.der == c.der for c in path):
            continue
        if not search.issued_by(current, candidate):
            continue
        problem = _issuer_problem(candidate, path, spiffe_id, now)
        if problem is not None:
            search.note(*problem)
            continue
        found = _build_path(path + [candidate], pool, bundle, spiffe_id, now, search)
        if found is not None:
            return found
    return None


def _parse_chain(chain_der: Sequence[bytes]) -> tuple[_Cert, ...]:
    if not chain_der:
        raise PeerIdentityError("peer_certificate_missing", "the peer presented no certificate")
    if len(chain_der) > MAX_PRESENTED_CERTS:
        raise PeerIdentityError("svid_chain_too_long",
                                f"{len(chain_der)} certificates presented, at most "
                                f"{MAX_PRESENTED_CERTS}")
    parsed = []
    for i, der in enumerate(chain_der):
        try:
            parsed.append(_parse_der(bytes(der)))
        except ValueError as exc:
            raise PeerIdentityError("svid_malformed",
                                    f"certificate [{i}] does not parse: {exc}") from None
    return tuple(parsed)


def _verify(chain: tuple[_Cert, ...], store: TrustStore, now: float,
            search: _Search) -> PeerIdentity:
    """Verify a parsed chain; `search.time_sensitive` tells whether `now` decided a failure."""
    leaf = chain[0]
    spiffe_id = _leaf_identity(leaf, ExtendedKeyUsageOID.CLIENT_AUTH)
    problem = leaf.validity_problem(now)
    if problem:
        search.time_sensitive = True
        raise PeerIdentityError(*problem)
    bundle = store.bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise PeerIdentityError("svid_unknown_trust_domain",
                                f"no trust bundle for {spiffe_id.trust_domain}")
    pool = tuple(c for c in chain[1:] if c.der != leaf.der)
    path = _build_path([leaf], pool, bundle, spiffe_id, now, search)
    if path is None:
        code, detail = search.reason or (
            "svid_untrusted", f"no path to an authority of {spiffe_id.trust_domain}")
        raise PeerIdentityError(code, detail)
    return PeerIdentity(
        spiffe_id=spiffe_id,
        uri=str(spiffe_id),
        cert_sha256=hashlib.sha256(leaf.der).digest(),
        not_before=max(c.not_before for c in path),
        not_after=min(c.not_after for c in path),
    )


def verify_svid_chain(chain_der: Sequence[bytes], store: TrustStore, now: float) -> PeerIdentity:
    """Verify the chain a TLS peer presented (leaf first, DER) as a caller's X.509-SVID."""
    return _verify(_parse_chain(chain_der), store, now, _Search())


class PeerCertificates:
    """The chain a TLS peer presented (leaf first, DER), plus a memo of the last verification
    keyed by `TrustStore.version` (a pure-function memo: same chain, same store version, same
    answer; only the validity window depends on `now` and is checked every call). Because the memo
    depends on nothing but the chain bytes, connections that presented byte-identical chains may
    share one instance (the runtime does, weakly: `runtime.listener.PeerChains`)."""

    __slots__ = ("chain_der", "_parsed", "_version", "_identity", "_failure", "__weakref__")

    def __init__(self, chain_der: tuple[bytes, ...]) -> None:
        self.chain_der = tuple(chain_der)
        self._parsed: tuple[_Cert, ...] | None = None
        self._version: int | None = None
        self._identity: PeerIdentity | None = None
        self._failure: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"PeerCertificates({len(self.chain_der)} certificates)"

    @property
    def identity(self) -> PeerIdentity | None:
        """The identity of the last successful verification (for audit records of requests that
        failed later checks); None if none succeeded."""
        return self._identity


def verify_peer(peer: PeerCertificates, store: TrustStore, now: float) -> PeerIdentity:
    """`verify_svid_chain`, memoised on `peer` per `store.version`."""
    if peer._version == store.version:
        identity = peer._identity
        if identity is not None and identity.not_before <= now <= identity.not_after:
            return identity
        if peer._failure is not None:
            raise PeerIdentityError(*peer._failure)
    peer._version, peer._identity, peer._failure = None, None, None
    search = _Search()
    try:
        if peer._parsed is None:
            peer._parsed = _parse_chain(peer.chain_der)
        identity = _verify(peer._parsed, store, now, search)
    except PeerIdentityError as err:
        if not search.time_sensitive:
            peer._version, peer._failure = store.version, (err.code, err.detail)
        raise
    peer._version, peer._identity = store.version, identity
    return identity


# --------------------------------------------------------------------------------------------
# The sidecar's own SVID
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnSvid:
    """The sidecar's own X.509-SVID, checked at load (the key is never in the repr)."""

    spiffe_id: SpiffeId
    cert_chain_pem: bytes  # leaf + intermediates, re-encoded as clean PEM
    key_pem: bytes = field(repr=False)
    not_after: float
    leaf_sha256: bytes


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_own_svid(cert_pem: bytes, key_pem: bytes, now: float) -> OwnSvid:
    """Load and check the sidecar's own SVID (leaf first, then intermediates) and its key.

    Raises `InvalidValue` if there is no certificate, the key does not match the leaf, the leaf
    breaks an X.509-SVID leaf rule (for a server: an EKU must allow serverAuth), the chain is out
    of order, or the leaf has already expired at `now`.
    """
    try:
        certs = x509.load_pem_x509_certificates(bytes(cert_pem))
    except ValueError:
        raise InvalidValue("SVID file has no parseable certificate") from None
    try:
        chain = [_Cert(c) for c in certs]
    except ValueError as exc:
        raise InvalidValue(f"SVID certificate does not parse ({exc})") from None
    try:
        key = serialization.load_pem_private_key(bytes(key_pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidValue("SVID key is not an unencrypted PEM private key") from None
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.cert.public_key()):
        raise InvalidValue("SVID key does not match the leaf certificate's public key")
    try:
        spiffe_id = _leaf_identity(leaf, ExtendedKeyUsageOID.SERVER_AUTH)
    except PeerIdentityError as err:
        raise InvalidValue(f"not a valid X.509-SVID: {err.detail}") from None
    for i in range(1, len(chain)):
        try:
            chain[i - 1].cert.verify_directly_issued_by(chain[i].cert)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            raise InvalidValue(f"SVID chain out of order: certificate [{i}] did not issue "
                               f"certificate [{i - 1}]") from None
    if now > leaf.not_after:
        raise InvalidValue(f"SVID expired at {leaf.not_after:.0f}")
    return OwnSvid(
        spiffe_id=spiffe_id,
        cert_chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs),
        key_pem=bytes(key_pem),
        not_after=leaf.not_after,
        leaf_sha256=hashlib.sha256(leaf.der).digest(),
    )
