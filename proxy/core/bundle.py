"""Policy bundles: format, hashing, signatures and the rules a bundle must pass before it is used.

Pure (DESIGN rule 1): bytes in, values or `BundleError` out; the clock is the `now` argument.
Reading and writing directories and tar.gz files is `proxy.bundles.io`; the CLI is
`proxy.bundles.cli`. Distribution follows the OPA bundle wire protocol (DESIGN section 5);
Portcullis adds a mandatory signature when keys are configured, no rollback, and expiry.

Layout (a directory or a tar.gz with these members at its root):
    policy.yaml                required; compiled by `proxy.core.policy` (not here)
    data/revocations.json      optional: {"spiffe_ids": [..], "subjects": [{"iss": .., "sub": ..}],
                               "clients": [..], "jtis": [..]}; every key optional, no other key,
                               non-empty strings, SPIFFE IDs valid (`core.spiffe`);
                               parsed by `revocations`
    any other file             allowed when listed in the manifest (more policy files, data)
    .manifest.json             the manifest (below)
    .signature.json            the detached signature (below); absent = unsigned

Manifest: exactly the RFC 8785 canonical bytes (`core.audit.canonical`) of
    {"created_at": "2026-01-02T03:04:05Z", "expires_at": "..." | null,
     "files": {"<path>": "<64 lowercase hex sha256>", ...}, "revision": <int 1..2**53-1>}
- No other member; a manifest that is valid JSON but not in canonical form is refused, so one
  content has exactly one manifest and `digest` (hex SHA-256 of the manifest bytes) names it.
- Times are RFC 3339 in UTC written with `Z` (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`); `build` writes
  whole seconds (created_at rounded down, expires_at rounded down). expires_at > created_at.
- `files` lists every file of the bundle except the manifest and the signature, and must list
  `policy.yaml`. Paths: POSIX relative, segments of [A-Za-z0-9._-] not starting with "." (so no
  `.`/`..`, no hidden files, no absolute path, no backslash, no empty segment), at most 512
  characters; no two paths equal ignoring case, and no path is a directory of another (`a` and
  `a/b`): every bundle can be written to any file system.

Signature (`.signature.json`): a JSON object, exactly {"alg", "kid", "sig"}:
- `alg`: "EdDSA" (Ed25519, RFC 8032) or "ES256" (ECDSA P-256 + SHA-256, the signature as R||S,
  32 bytes each, RFC 7518 section 3.4; R and S in [1, n-1]);
- `kid`: `key_id(public key)` = first 16 hex of SHA-256 over the raw 32-byte Ed25519 key (the
  audit `key_id`) or over the uncompressed SEC1 point (65 bytes) of a P-256 key;
- `sig`: unpadded base64url of the signature over the exact manifest bytes.
Several public keys may be trusted at once (rotation): the kid selects one, and the key's type must
match `alg` (an EdDSA kid never verifies as ES256).

`verify` checks, in this order, raising `BundleError` with the code in brackets:
1. signature: mandatory when `public_keys` is non-empty OR `require_signature` [bundle_unsigned]
   (with `require_signature` and no key, a signed bundle cannot be checked [bundle_unknown_key]);
   malformed, `alg`/key type mismatch or not verifying [bundle_bad_signature]; kid not trusted
   [bundle_unknown_key]. With no keys and not required (dev mode), an unsigned bundle passes and
   a signed one is checked for shape only; `signed_by` is set only when a signature verified.
2. manifest shape and canonical form [bundle_bad_manifest];
3. files: every listed file present [bundle_missing_file], nothing unlisted [bundle_extra_file],
   every hash exact [bundle_hash_mismatch];
4. data/revocations.json, when present, has the documented shape [bundle_bad_data];
5. created_at not later than now + max_skew_s [bundle_not_yet_valid]; expires_at: now >= expires_at
   is [bundle_expired] unless now < expires_at + grace_s, then the bundle is returned with
   `in_grace=True` and the caller decides;
6. revision (when `active_revision` is given): lower [bundle_rollback]; equal: returned with
   `unchanged=True` when the digest equals `active_digest`, otherwise (also when `active_digest` is
   None) [bundle_same_revision_different_content]. "Unchanged" is a flag, not an exception, so a
   caller that counts BundleErrors as failed refreshes never counts a no-op as one.

`inspect` never raises for bundle content: it lists every problem it can find (for the CLI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import sha256
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (decode_dss_signature,
                                                             encode_dss_signature)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.core.audit import canonical
from proxy.core.jose import b64url_decode, b64url_encode, json_object
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import BundleError, InvalidValue

MANIFEST_NAME = ".manifest.json"
SIGNATURE_NAME = ".signature.json"
POLICY_NAME = "policy.yaml"
REVOCATIONS_NAME = "data/revocations.json"
MAX_REVISION = 2**53 - 1
MAX_PATH_CHARS = 512
DEFAULT_MAX_SKEW_S = 60.0
ALGS = ("EdDSA", "ES256")

#: Every code a BundleError may carry (core and io). Never rename one, only add.
CODES = frozenset({
    "bundle_unsigned", "bundle_bad_signature", "bundle_unknown_key", "bundle_bad_manifest",
    "bundle_missing_file", "bundle_extra_file", "bundle_hash_mismatch", "bundle_bad_data",
    "bundle_not_yet_valid", "bundle_expired", "bundle_rollback",
    "bundle_same_revision_different_content",
    # raised by proxy.bundles.io / build input checks
    "bundle_too_large", "bundle_unsafe_path", "bundle_unreadable",
})

_MANIFEST_KEYS = frozenset({"revision", "created_at", "expires_at", "files"})
_SIGNATURE_KEYS = frozenset({"alg", "kid", "sig"})
_REVOCATION_KEYS = ("spiffe_ids", "subjects", "clients", "jtis")
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_PATH_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_KID_RE = re.compile(r"[0-9a-f]{16}")
_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    """What was read (from disk, a tar.gz or the network): not yet trusted."""

    manifest_bytes: bytes
    signature_bytes: bytes | None
    files: Mapping[str, bytes]  # path -> content, manifest and signature excluded


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle that passed `verify`. `signed_by` is the kid of the key whose signature verified
    (None: unsigned, or dev mode without keys). `in_grace`: expired but within `grace_s`.
    `unchanged`: same revision and digest as the active bundle (nothing to install)."""

    revision: int
    created_at: float
    expires_at: float | None
    files: Mapping[str, bytes]
    digest: str
    signed_by: str | None
    in_grace: bool = False
    unchanged: bool = False
    manifest_bytes: bytes = b""
    signature_bytes: bytes | None = None

    def bundle(self) -> Bundle:
        """The bytes as read, for writing back (`proxy.bundles.io.persist`)."""
        return Bundle(self.manifest_bytes, self.signature_bytes, self.files)


@dataclass(frozen=True, slots=True)
class Manifest:
    revision: int
    created_at: float
    expires_at: float | None
    files: Mapping[str, str]  # path -> hex sha256


@dataclass(frozen=True, slots=True)
class Signature:
    alg: str
    kid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Revocations:
    """Parsed `data/revocations.json`. `subjects` holds (iss, sub) pairs."""

    spiffe_ids: frozenset[str] = frozenset()
    subjects: frozenset[tuple[str, str]] = frozenset()
    clients: frozenset[str] = frozenset()
    jtis: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.spiffe_ids or self.subjects or self.clients or self.jtis)


EMPTY_REVOCATIONS = Revocations()


# --------------------------------------------------------------------------------------------
# Helpers: times, paths, keys
# --------------------------------------------------------------------------------------------


def format_time(t: float) -> str:
    """RFC 3339 UTC, whole seconds (rounded down): `2026-01-02T03:04:05Z`."""
    return f"{datetime.fromtimestamp(int(t // 1), tz=timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def parse_time(text: Any) -> float:
    """`YYYY-MM-DDTHH:MM:SS[.fraction]Z` -> POSIX seconds; `InvalidValue` otherwise."""
    m = _TIME_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidValue("not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SS[.f]Z)", str(text))
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    try:
        base = datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise InvalidValue("not a valid date and time", text) from None
    frac = m.group(7)
    return base + (int(frac) / 10 ** len(frac) if frac else 0.0)


def check_path(path: Any) -> str | None:
    """Why `path` may not name a bundle file, or None when it may."""
    if not isinstance(path, str):
        return "must be a string"
    if len(path) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if not _PATH_RE.fullmatch(path):
        return ("must be a relative POSIX path of [A-Za-z0-9._-] segments, none empty or "
                "starting with '.'")
    return None


def _path_conflicts(paths: Sequence[str]) -> list[str]:
    """Paths that collide ignoring case, or that are a directory of another path."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for p in paths:
        folded = p.casefold()
        if folded in seen and seen[folded] != p:
            out.append(f"{p!r} and {seen[folded]!r} differ only in case")
        seen.setdefault(folded, p)
    dirs = {p.casefold()[: i] for p in paths for i, c in enumerate(p) if c == "/"}
    for p in paths:
        if p.casefold() in dirs:
            out.append(f"{p!r} is both a file and a directory")
    return out


def key_id(public_key: PublicKey) -> str:
    """16 hex: SHA-256 over the raw Ed25519 key (as audit `key_id`) or the uncompressed P-256
    point. `InvalidValue` for any other key."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    elif isinstance(public_key, ec.EllipticCurvePublicKey) \
            and isinstance(public_key.curve, ec.SECP256R1):
        raw = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    else:
        raise InvalidValue("bundle keys must be Ed25519 or ECDSA P-256",
                           type(public_key).__name__)
    return sha256(raw).hexdigest()[:16]


def alg_for(key: PublicKey | PrivateKey) -> str:
    """The signature `alg` of a supported key; `InvalidValue` otherwise."""
    if isinstance(key, (Ed25519PublicKey, Ed25519PrivateKey)):
        return "EdDSA"
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) \
            and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise InvalidValue("bundle keys must be Ed25519 or ECDSA P-256", type(key).__name__)


def sign(manifest_bytes: bytes, signer: PrivateKey) -> bytes:
    """The `.signature.json` bytes for `manifest_bytes`."""
    alg = alg_for(signer)
    if alg == "EdDSA":
        sig = signer.sign(manifest_bytes)  # type: ignore[call-arg]
    else:
        r, s = decode_dss_signature(signer.sign(manifest_bytes,  # type: ignore[call-arg]
                                                ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return canonical({"alg": alg, "kid": key_id(signer.public_key()),
                      "sig": b64url_encode(sig)})


def _signature_ok(alg: str, key: PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        if alg == "EdDSA":
            if not isinstance(key, Ed25519PublicKey) or len(sig) != 64:
                return False
            key.verify(sig, data)
            return True
        if alg_for(key) != "ES256" or len(sig) != 64:
            return False
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
            return False
        key.verify(encode_dss_signature(r, s), data,  # type: ignore[union-attr]
                   ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, InvalidValue, ValueError, TypeError):
        return False


def digest_of(data: bytes) -> str:
    return sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Parsing the manifest, the signature and the data files
# --------------------------------------------------------------------------------------------


def parse_signature(data: bytes) -> Signature:
    """Shape of `.signature.json`; BundleError `bundle_bad_signature`."""
    try:
        obj = json_object(data, "signature")
    except InvalidValue as exc:
        raise BundleError("bundle_bad_signature", str(exc)) from None
    keys = set(obj)
    if keys != _SIGNATURE_KEYS:
        raise BundleError("bundle_bad_signature",
                          f"members must be exactly alg, kid, sig; got {', '.join(sorted(keys))}")
    alg, kid, sig = obj["alg"], obj["kid"], obj["sig"]
    if alg not in ALGS:
        raise BundleError("bundle_bad_signature", f"alg must be EdDSA or ES256; got {alg!r}")
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise BundleError("bundle_bad_signature", f"kid must be 16 lowercase hex; got {kid!r}")
    if not isinstance(sig, str):
        raise BundleError("bundle_bad_signature", "sig must be a string")
    try:
        raw = b64url_decode(sig)
    except InvalidValue:
        raise BundleError("bundle_bad_signature", "sig is not unpadded base64url") from None
    if len(raw) != 64:
        raise BundleError("bundle_bad_signature", f"sig must be 64 bytes; got {len(raw)}")
    return Signature(alg, kid, raw)


def parse_manifest(data: bytes) -> Manifest:
    """Shape and canonical form of `.manifest.json`; BundleError `bundle_bad_manifest` naming every
    problem found."""
    try:
        obj = json_object(data, "manifest")
    except InvalidValue as exc:
        raise BundleError("bundle_bad_manifest", str(exc)) from None
    problems: list[str] = []
    for k in sorted(set(obj) - _MANIFEST_KEYS):
        problems.append(f"{k}: unknown member")
    for k in sorted(_MANIFEST_KEYS - set(obj)):
        problems.append(f"{k}: is required")

    revision = obj.get("revision")
    if "revision" in obj and (type(revision) is not int or not 1 <= revision <= MAX_REVISION):
        problems.append(f"revision: must be an integer 1..{MAX_REVISION}; got {revision!r}")
    created_at = expires_at = None
    if "created_at" in obj:
        try:
            created_at = parse_time(obj["created_at"])
        except InvalidValue as exc:
            problems.append(f"created_at: {exc}")
    if obj.get("expires_at") is not None:
        try:
            expires_at = parse_time(obj["expires_at"])
        except InvalidValue as exc:
            problems.append(f"expires_at: {exc}")
    if created_at is not None and expires_at is not None and expires_at <= created_at:
        problems.append("expires_at: must be later than created_at")

    files = obj.get("files")
    if "files" in obj:
        if not isinstance(files, dict):
            problems.append("files: must be an object")
            files = {}
        for path, h in files.items():
            why = check_path(path)
            if why:
                problems.append(f"files[{path!r}]: path {why}")
            if not isinstance(h, str) or not _HEX64_RE.fullmatch(h):
                problems.append(f"files[{path!r}]: must be 64 lowercase hex (sha256)")
        problems.extend(f"files: {c}" for c in _path_conflicts(list(files)))
        if POLICY_NAME not in files:
            problems.append(f"files: must list {POLICY_NAME}")
    if not problems:
        try:
            if canonical(obj) != data:
                problems.append("not in RFC 8785 canonical form")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise BundleError("bundle_bad_manifest", "; ".join(problems))
    return Manifest(revision, created_at, expires_at,  # type: ignore[arg-type]
                    MappingProxyType(dict(files)))  # type: ignore[arg-type]


def parse_revocations(data: bytes) -> Revocations:
    """Shape of `data/revocations.json`; BundleError `bundle_bad_data` naming every problem."""
    try:
        obj = json_object(data, REVOCATIONS_NAME)
    except InvalidValue as exc:
        raise BundleError("bundle_bad_data", str(exc)) from None
    problems: list[str] = []
    for k in sorted(set(obj) - set(_REVOCATION_KEYS)):
        problems.append(f"{k}: unknown member (known: {', '.join(_REVOCATION_KEYS)})")
    out: dict[str, set[Any]] = {k: set() for k in _REVOCATION_KEYS}
    for key in _REVOCATION_KEYS:
        items = obj.get(key, [])
        if not isinstance(items, list):
            problems.append(f"{key}: must be a list")
            continue
        for i, item in enumerate(items):
            where = f"{key}[{i}]"
            if key == "subjects":
                if not isinstance(item, dict) or set(item) != {"iss", "sub"}:
                    problems.append(f"{where}: must be an object with exactly iss and sub")
                    continue
                iss, sub = item["iss"], item["sub"]
                if not (isinstance(iss, str) and iss and isinstance(sub, str) and sub):
                    problems.append(f"{where}: iss and sub must be non-empty strings")
                    continue
                out[key].add((iss, sub))
                continue
            if not isinstance(item, str) or not item:
                problems.append(f"{where}: must be a non-empty string")
                continue
            if key == "spiffe_ids":
                try:
                    parse_spiffe_id(item)
                except InvalidValue as exc:
                    problems.append(f"{where}: {exc}")
                    continue
            out[key].add(item)
    if problems:
        raise BundleError("bundle_bad_data", f"{REVOCATIONS_NAME}: " + "; ".join(problems))
    return Revocations(**{k: frozenset(v) for k, v in out.items()})


def revocations(vb: VerifiedBundle) -> Revocations:
    """The bundle's revocations (`EMPTY_REVOCATIONS` when it has no `data/revocations.json`)."""
    data = vb.files.get(REVOCATIONS_NAME)
    return EMPTY_REVOCATIONS if data is None else parse_revocations(data)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def build(files: Mapping[str, bytes], *, revision: int, now: float, expires_at: float | None,
          signer: PrivateKey | None) -> Bundle:
    """A bundle of `files` (path -> bytes; must hold `policy.yaml`), created at `now`, signed by
    `signer` (Ed25519 or P-256) or unsigned. BundleError for unusable input (bad path
    [bundle_unsafe_path], no policy [bundle_missing_file], bad revision or times
    [bundle_bad_manifest], bad revocations [bundle_bad_data]); `InvalidValue` for an unsupported
    key."""
    bad = [f"{p!r} {why}" for p in files if (why := check_path(p))]
    bad += _path_conflicts([p for p in files if isinstance(p, str)])
    if bad:
        raise BundleError("bundle_unsafe_path", "; ".join(bad))
    if POLICY_NAME not in files:
        raise BundleError("bundle_missing_file", f"a bundle needs {POLICY_NAME}")
    for p, content in files.items():
        if not isinstance(content, (bytes, bytearray)):
            raise TypeError(f"bundle file {p!r} must be bytes")
    if type(revision) is not int or not 1 <= revision <= MAX_REVISION:
        raise BundleError("bundle_bad_manifest",
                          f"revision must be an integer 1..{MAX_REVISION}; got {revision!r}")
    created = format_time(now)
    expires = None if expires_at is None else format_time(expires_at)
    if expires is not None and parse_time(expires) <= parse_time(created):
        raise BundleError("bundle_bad_manifest", "expires_at must be later than created_at")
    if REVOCATIONS_NAME in files:
        parse_revocations(bytes(files[REVOCATIONS_NAME]))
    if signer is not None:
        alg_for(signer)  # unsupported key: fail before anything is produced
    frozen = {p: bytes(files[p]) for p in sorted(files)}
    manifest = canonical({"revision": revision, "created_at": created, "expires_at": expires,
                          "files": {p: digest_of(c) for p, c in frozen.items()}})
    signature = None if signer is None else sign(manifest, signer)
    return Bundle(manifest, signature, MappingProxyType(frozen))


# --------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------


def _keys_by_id(public_keys: Sequence[PublicKey]) -> dict[str, list[PublicKey]]:
    out: dict[str, list[PublicKey]] = {}
    for k in public_keys:
        out.setdefault(key_id(k), []).append(k)
    return out


def _check_signature(bundle: Bundle, public_keys: Sequence[PublicKey],
                     require_signature: bool) -> str | None:
    keys = _keys_by_id(public_keys)  # InvalidValue for an unsupported trusted key: a caller bug
    mandatory = bool(keys) or require_signature
    if bundle.signature_bytes is None:
        if mandatory:
            raise BundleError("bundle_unsigned", "a signature is required and there is none")
        return None
    sig = parse_signature(bundle.signature_bytes)
    if not mandatory:
        return None  # dev mode: shape checked, nothing to check it against
    candidates = keys.get(sig.kid)
    if not candidates:
        trusted = ", ".join(sorted(keys)) or "none configured"
        raise BundleError("bundle_unknown_key", f"signed by kid {sig.kid}; trusted: {trusted}")
    for key in candidates:
        if alg_for(key) != sig.alg:
            raise BundleError("bundle_bad_signature",
                              f"alg {sig.alg} does not match the {alg_for(key)} key {sig.kid}")
        if _signature_ok(sig.alg, key, sig.sig, bundle.manifest_bytes):
            return sig.kid
    raise BundleError("bundle_bad_signature", f"signature by {sig.kid} does not verify")


def _check_files(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    missing = sorted(set(manifest.files) - set(files))
    if missing:
        raise BundleError("bundle_missing_file", ", ".join(missing))
    extra = sorted(set(files) - set(manifest.files))
    if extra:
        raise BundleError("bundle_extra_file", ", ".join(extra))
    bad = [p for p, h in sorted(manifest.files.items()) if digest_of(files[p]) != h]
    if bad:
        raise BundleError("bundle_hash_mismatch", ", ".join(bad))


def verify(bundle: Bundle, *, public_keys: Sequence[PublicKey], require_signature: bool,
           now: float, active_revision: int | None, active_digest: str | None = None,
           grace_s: float = 0, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> VerifiedBundle:
    """Check `bundle` against every rule of the module docstring, in that order; the first rule
    broken raises its BundleError. `InvalidValue` if a trusted key is not Ed25519 / P-256."""
    signed_by = _check_signature(bundle, public_keys, require_signature)
    manifest = parse_manifest(bundle.manifest_bytes)
    _check_files(manifest, bundle.files)
    if REVOCATIONS_NAME in bundle.files:
        parse_revocations(bundle.files[REVOCATIONS_NAME])

    if manifest.created_at > now + max_skew_s:
        raise BundleError("bundle_not_yet_valid",
                          f"created_at {format_time(manifest.created_at)} is in the future")
    in_grace = False
    if manifest.expires_at is not None and now >= manifest.expires_at:
        if now < manifest.expires_at + grace_s:
            in_grace = True
        else:
            raise BundleError("bundle_expired",
                              f"expired at {format_time(manifest.expires_at)}")

    digest = digest_of(bundle.manifest_bytes)
    unchanged = False
    if active_revision is not None:
        if manifest.revision < active_revision:
            raise BundleError("bundle_rollback", f"revision {manifest.revision} is lower than "
                                                 f"the active revision {active_revision}")
        if manifest.revision == active_revision:
            if active_digest is None or digest != active_digest:
                raise BundleError("bundle_same_revision_different_content",
                                  f"revision {manifest.revision} is active with other content")
            unchanged = True

    return VerifiedBundle(
        revision=manifest.revision, created_at=manifest.created_at,
        expires_at=manifest.expires_at,
        files=MappingProxyType({p: bundle.files[p] for p in sorted(manifest.files)}),
        digest=digest, signed_by=signed_by, in_grace=in_grace, unchanged=unchanged,
        manifest_bytes=bundle.manifest_bytes, signature_bytes=bundle.signature_bytes)


# --------------------------------------------------------------------------------------------
# Inspect (diagnostics for the CLI: never raises on bundle content)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileReport:
    path: str
    size: int | None  # None: missing
    listed_sha256: str | None  # None: not in the manifest
    sha256: str | None  # None: missing
    status: str  # ok | missing | extra | mismatch


@dataclass(frozen=True, slots=True)
class Inspection:
    manifest: Mapping[str, Any] | None  # the manifest as parsed JSON, when it is a JSON object
    digest: str
    signature: Signature | None
    files: tuple[FileReport, ...]
    problems: tuple[tuple[str, str], ...] = field(default=())  # (code, detail)

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect(bundle: Bundle, *, now: float, public_keys: Sequence[PublicKey] = (),
            max_skew_s: float = DEFAULT_MAX_SKEW_S) -> Inspection:
    """Everything about `bundle` and every problem found, without trusting it. An unsigned bundle
    is reported as a problem (`bundle_unsigned`) only when `public_keys` are given."""
    problems: list[tuple[str, str]] = []

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except BundleError as exc:
            problems.append((exc.code, exc.detail))
            return None

    raw: Mapping[str, Any] | None
    try:
        raw = json_object(bundle.manifest_bytes, "manifest")
    except InvalidValue:
        raw = None
    signature = None
    if bundle.signature_bytes is not None:
        signature = attempt(parse_signature, bundle.signature_bytes)
    if public_keys and (bundle.signature_bytes is None or signature is not None):
        attempt(_check_signature, bundle, public_keys, True)
    manifest = attempt(parse_manifest, bundle.manifest_bytes)

    listed: dict[str, str | None] = {}
    if manifest is not None:
        listed = dict(manifest.files)
    elif raw is not None and isinstance(raw.get("files"), dict):
        listed = {str(p): (h if isinstance(h, str) else None) for p, h in raw["files"].items()}
    reports = []
    for path in sorted(set(listed) | set(bundle.files)):
        content = bundle.files.get(path)
        actual = None if content is None else digest_of(content)
        if path not in listed:
            status = "extra"
        elif content is None:
            status = "missing"
        else:
            status = "ok" if listed[path] == actual else "mismatch"
        reports.append(FileReport(path, None if content is None else len(content),
                                  listed.get(path), actual, status))
    for status, code in (("missing", "bundle_missing_file"), ("extra", "bundle_extra_file"),
                         ("mismatch", "bundle_hash_mismatch")):
        names = [r.path for r in reports if r.status == status]
        if names and (manifest is not None or raw is not None):
            problems.append((code, ", ".join(names)))
    if REVOCATIONS_NAME in bundle.files:
        attempt(parse_revocations, bundle.files[REVOCATIONS_NAME])
    if manifest is not None:
        if manifest.created_at > now + max_skew_s:
            problems.append(("bundle_not_yet_valid",
                             f"created_at {format_time(manifest.created_at)} is in the future"))
        if manifest.expires_at is not None and now >= manifest.expires_at:
            problems.append(("bundle_expired", f"expired at {format_time(manifest.expires_at)}"))
    return Inspection(raw, digest_of(bundle.manifest_bytes), signature, tuple(reports),
                      tuple(problems))
