"""Control plane configuration: one YAML file, validated once at load into frozen dataclasses.

Rules (DESIGN rule 5, same style as `proxy.config`):
- Unknown keys are errors; every problem is reported with its key path (`bundles[1].name: ...`).
- Units are in the names (`_s`, `_bytes`). Relative file paths are resolved against the directory
  of the config file.
- The control plane's own API policy file is required: there is no default that allows anything.
- Environment overrides `PORTCULLIS_CP_<SECTION>__<KEY>=value` work like the sidecar's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping


from proxy.config import (TrustDomainConfig, apply_env_overrides, path_resolver, resolve_identity,
                          yaml_document)
from proxy.core.schema import build, meta
from proxy.errors import ConfigError

ENV_PREFIX = "PORTCULLIS_CP_"

#: Bundle names are one URL path segment: letters, digits, `-`, `_`, `.` (not leading).
BUNDLE_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
_BUNDLE_NAME_RE = re.compile(BUNDLE_NAME)


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0..65535"


def _unique_trust_domains(tds: tuple[TrustDomainConfig, ...]) -> str | None:
    names = [t.name for t in tds]
    dup = sorted({n for n in names if names.count(n) > 1})
    return f"trust domain listed twice: {', '.join(dup)}" if dup else None


def valid_bundle_name(name: str) -> bool:
    return _BUNDLE_NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = field(default="127.0.0.1", metadata=meta(nonempty=True, doc="listen address (mTLS)"))
    port: int = field(default=8444, metadata=meta(check=_port, doc="listen port (0 = any free port)"))
    tls_min_version: Literal["1.2", "1.3"] = field(default="1.2", metadata=meta(doc="lowest TLS version"))
    max_upload_bytes: int = field(default=16 << 20, metadata=meta(min=1024, doc="largest request body (publish tar.gz)"))


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    svid_file: str = field(metadata=meta(nonempty=True, doc="own X.509-SVID chain (leaf first, PEM)"))
    svid_key_file: str = field(metadata=meta(nonempty=True, doc="own SVID private key (PEM)"))
    trust_domains: tuple[TrustDomainConfig, ...] = field(
        metadata=meta(nonempty=True, check=_unique_trust_domains,
                      doc="trust domains whose workloads may call (sidecars, deployers)"))
    watch_interval_s: float = field(default=2.0, metadata=meta(min=0.05, doc="SVID / bundle / policy file poll interval"))


@dataclass(frozen=True, slots=True)
class SigningConfig:
    key_file: str = field(metadata=meta(nonempty=True, doc="bundle signing key: Ed25519 or P-256, unencrypted PKCS#8 PEM"))
    previous_public_key_files: tuple[str, ...] = field(default=(), metadata=meta(doc="public keys (PEM) of retired signing keys: stored revisions they signed are re-signed at start"))


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str = field(metadata=meta(nonempty=True, doc="state directory (revisions, written atomically)"))
    keep_revisions: int = field(default=10, metadata=meta(min=1, max=100000, doc="revisions kept per bundle (rollback targets)"))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    file: str = field(metadata=meta(nonempty=True, doc="Portcullis policy deciding every API request"))


@dataclass(frozen=True, slots=True)
class BundleConfig:
    name: str = field(metadata=meta(pattern=BUNDLE_NAME, doc="bundle name (GET /bundles/<name>)"))
    source_dir: str | None = field(default=None, metadata=meta(nonempty=True, doc="published as the first revision when the state has none"))
    expires_after_s: float = field(default=0.0, metadata=meta(min=0, doc="signed expiry of each revision (0 = none); re-signed at half-life"))
    trust_domains: tuple[str, ...] | None = field(default=None, metadata=meta(nonempty=True, doc="trust domains the bundle's policy may name (default: not checked)"))


def _unique_bundles(bundles: tuple[BundleConfig, ...]) -> str | None:
    names = [b.name for b in bundles]
    dup = sorted({n for n in names if names.count(n) > 1})
    return f"bundle listed twice: {', '.join(dup)}" if dup else None


@dataclass(frozen=True, slots=True)
class LongPollConfig:
    max_wait_s: float = field(default=60.0, metadata=meta(min=0, max=3600, doc="cap on Prefer: wait=<s>"))
    advertise_opa_long_polling: bool = field(default=False, metadata=meta(doc="answer 200s with Content-Type application/vnd.openpolicyagent.bundles so OPA clients switch to long polling"))


@dataclass(frozen=True, slots=True)
class FleetConfig:
    stale_after_s: float = field(default=120.0, metadata=meta(min=1, doc="reports older than this are flagged stale"))
    max_reporters: int = field(default=100000, metadata=meta(min=1, doc="sidecars remembered (oldest forgotten first)"))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_files: int = field(default=1000, metadata=meta(min=1, doc="files in an uploaded source tar.gz"))
    max_file_bytes: int = field(default=8 << 20, metadata=meta(min=1024, doc="largest file in an upload (uncompressed)"))
    max_total_bytes: int = field(default=64 << 20, metadata=meta(min=1024, doc="all files of an upload (uncompressed)"))
    max_revocation_entries: int = field(default=100000, metadata=meta(min=1, doc="entries in data/revocations.json"))


@dataclass(frozen=True, slots=True)
class AuditConfig:
    sidecar_requests: bool = field(default=False, metadata=meta(doc="also audit allowed bundle fetches and status reports (denials and management requests always are)"))


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    identity: IdentityConfig = field(metadata=meta(doc="own SVID and the callers' trust bundles"))
    signing: SigningConfig = field(metadata=meta(doc="bundle signing key"))
    state: StateConfig = field(metadata=meta(doc="durable state"))
    policy: PolicyConfig = field(metadata=meta(doc="authorization of this API"))
    bundles: tuple[BundleConfig, ...] = field(metadata=meta(nonempty=True, check=_unique_bundles, doc="bundles served"))
    listener: ListenerConfig = field(default_factory=ListenerConfig, metadata=meta(doc="mTLS listener"))
    long_poll: LongPollConfig = field(default_factory=LongPollConfig, metadata=meta(doc="long polling"))
    fleet: FleetConfig = field(default_factory=FleetConfig, metadata=meta(doc="sidecar status reports"))
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata=meta(doc="upload limits"))
    audit: AuditConfig = field(default_factory=AuditConfig, metadata=meta(doc="audit lines on stdout"))
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=meta(doc="stderr log level"))

    @property
    def trust_domain_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.identity.trust_domains)

    def bundle(self, name: str) -> BundleConfig | None:
        for b in self.bundles:
            if b.name == name:
                return b
        return None


def _resolve(cfg: ControlPlaneConfig, base: Path) -> ControlPlaneConfig:
    r = path_resolver(base)
    return dataclasses.replace(
        cfg,
        identity=resolve_identity(cfg.identity, r),
        signing=dataclasses.replace(
            cfg.signing, key_file=r(cfg.signing.key_file),
            previous_public_key_files=tuple(r(f) for f in cfg.signing.previous_public_key_files)),
        state=dataclasses.replace(cfg.state, dir=r(cfg.state.dir)),
        policy=dataclasses.replace(cfg.policy, file=r(cfg.policy.file)),
        bundles=tuple(dataclasses.replace(b, source_dir=r(b.source_dir)) for b in cfg.bundles),
    )


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None,
                 env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    """Parse and validate control plane config text; raise ConfigError with every problem."""
    try:  # bounded like the sidecar's config (nesting, alias expansion)
        data = yaml_document(text)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", source=source)
    environ = os.environ if env is None else env
    # proxy.config's override syntax, under our own prefix
    problems = apply_env_overrides(data, {"PORTCULLIS_" + k[len(ENV_PREFIX):]: v
                                          for k, v in environ.items() if k.startswith(ENV_PREFIX)})
    try:
        cfg = build(ControlPlaneConfig, data, source=source)
    except ConfigError as exc:
        raise ConfigError(problems + list(exc.problems), source=source) from None
    if problems:
        raise ConfigError(problems, source=source)
    return _resolve(cfg, base_dir or Path("."))


def load_config(path: str | os.PathLike[str],
                env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=str(p)) from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent, env=env)
