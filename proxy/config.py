"""Sidecar configuration: one YAML file, validated once at load into frozen dataclasses.

Rules (DESIGN.md rule 5 and section 5):
- Unknown keys are errors; every problem is reported with its key path (`listener.port: ...`).
- Units are in the names (`_s`, `_bytes`); durations are seconds (float), sizes are bytes (int).
- Environment overrides: `PORTCULLIS_<SECTION>__<KEY>=value` (nested keys joined by `__`, names
  case-insensitive) replace the value at that path; the value is parsed as a YAML scalar/flow value,
  so `PORTCULLIS_LISTENER__PORT=9443` is an integer. An override naming an unknown key is an error
  like any other unknown key. Variables without `__` are not overrides.
- Relative file paths are resolved against the directory of the config file.
- There is no default that allows traffic: the policy file is required.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, TypeVar

import yaml

from proxy.core.schema import build, meta
from proxy.core.spiffe import parse_trust_domain
from proxy.errors import ConfigError, InvalidValue, Problem

if TYPE_CHECKING:
    from proxy.core.policy import CompiledPolicy

ENV_PREFIX = "PORTCULLIS_"
#: Bounds on a parsed YAML document: values counted after alias expansion (a "billion laughs"
#: document is a few lines of text; every later step walks and may print it), and nesting. A
#: document without aliases has fewer values than characters, so the bound grows with the text:
#: MAX_YAML_VALUES plus one value per character (a 10,000-rule policy has ~250,000 values).
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


_NOT_JSON = object()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constant)
_JSON_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (RFC 8259 2), as the json module's


def _strict_json(text: str) -> Any:
    """The value of `text` as strict JSON (no NaN/Infinity), or `_NOT_JSON`: exactly what
    `json.loads` reads (the same values, the last of duplicate keys, the same refusals), but a
    top-level object is decoded member by member and a top-level member that is an array
    element by element. The C decoder holds the GIL for a whole call (a 10,000-rule policy,
    3.8 MB: ~100 ms), and a policy is read in a worker thread beside the event loop; in pieces,
    the loop gets the GIL between them (`bench/bench_reload.py`). (The two outer levels are read
    here, so the nesting a RecursionError stops at is two levels deeper than json.loads's; far
    past MAX_YAML_DEPTH, which `yaml_document` enforces next.)"""
    try:
        i = _skip(text, 0)
        if text[i:i + 1] != "{":
            return _JSON.decode(text)
        decode = _JSON.raw_decode
        obj: dict[str, Any] = {}
        i, done = _opened(text, i, "}")
        while not done:
            if text[i:i + 1] != '"':
                return _NOT_JSON
            key, i = decode(text, i)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                return _NOT_JSON
            i = _skip(text, i + 1)
            if text[i:i + 1] == "[":
                value: list[Any] = []
                i, end = _opened(text, i, "]")
                while not end:
                    item, i = decode(text, i)
                    value.append(item)
                    i, end = _after_value(text, i, "]")
                obj[key] = value
            else:
                obj[key], i = decode(text, i)
            i, done = _after_value(text, i, "}")
        if _skip(text, i) != len(text):
            return _NOT_JSON  # trailing data
        return obj
    except (ValueError, RecursionError):
        return _NOT_JSON


def _skip(text: str, i: int) -> int:
    return _JSON_WS.match(text, i).end()  # type: ignore[union-attr]


def _opened(text: str, i: int, close: str) -> tuple[int, bool]:
    """At an opening bracket: the position of the first value and whether it closes at once."""
    i = _skip(text, i + 1)
    if text[i:i + 1] == close:
        return i + 1, True
    return i, False


def _after_value(text: str, i: int, close: str) -> tuple[int, bool]:
    """After a value: past the ',' (False: a value follows) or the `close` (True); a ValueError
    for anything else."""
    i = _skip(text, i)
    c = text[i:i + 1]
    if c == ",":
        return _skip(text, i + 1), False
    if c == close:
        return i + 1, True
    raise ValueError(f"expected ',' or {close!r} at {i}")


def yaml_document(text: str) -> Any:
    """`yaml.safe_load`, bounded: raise `ValueError` (a message) for text that is not YAML, is nested
    deeper than the parser's recursion allows or `MAX_YAML_DEPTH`, or whose aliases expand past
    `MAX_YAML_VALUES` + len(text) values.

    A document that is JSON (it starts with `{`) is read by the JSON parser: JSON is YAML, and
    PyYAML needs seconds of CPU for a multi-megabyte policy (a 10,000-rule policy: ~6-14 s here,
    against ~0.1 s), all of it holding the GIL that the data plane shares. Text that starts with
    `{` but is not strict JSON (flow-style YAML, NaN) is read as YAML, as before."""
    data = _strict_json(text) if text.lstrip()[:1] == "{" else _NOT_JSON
    if data is _NOT_JSON:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {exc}") from None
        except RecursionError:
            raise ValueError("not valid YAML: nested too deeply") from None
    limit = MAX_YAML_VALUES + len(text)
    stack: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > limit:
            raise ValueError(f"document too large: more than {limit} values once YAML aliases "
                             f"are expanded ({MAX_YAML_VALUES} + one per character of text)")
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"document nested deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((x, depth + 1) for item in value.items() for x in item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((x, depth + 1) for x in value)
    return data


def policy_document(data: bytes, *, source: str) -> Any:
    """The document of a policy file, wherever it comes from (the sidecar's file, a bundle's
    `policy.yaml`, an uploaded source, the control plane's own policy, `bundle build`): UTF-8,
    then `yaml_document` (bounded; JSON read as JSON). ConfigError naming `source` otherwise."""
    try:
        return yaml_document(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8: {exc.reason} at byte {exc.start}", source=source) from None
    except ValueError as exc:
        raise ConfigError(str(exc), source=source) from None


def file_revision(sha256_hex: str) -> str:
    """The revision of a policy document that names none: `sha256:` and the first 12 hex digits
    of its file's SHA-256 (what audit records, /readyz and the policy tools show)."""
    return f"sha256:{sha256_hex[:12]}"


def compile_policy_bytes(data: bytes, *, source: str, revision: str,
                         trust_domains: frozenset[str] | None = None,
                         stamp_revision: bool = False) -> "CompiledPolicy":
    """Policy bytes -> CompiledPolicy, for every reader of a policy (the sidecar's file and bundle,
    the control plane's sources and own policy, `bundle build`, `policy test`): `policy_document`
    then `core.policy.compile_policy`; ConfigError naming `source`. `stamp_revision`: the
    document's own `revision` is replaced by `revision` (a bundle's revision is the one every
    audit record names); otherwise `revision` is used only when the document has none."""
    from proxy.core.policy import compile_policy  # the compiler is not needed to read a config

    doc = policy_document(data, source=source)
    if stamp_revision and isinstance(doc, dict):
        doc = {**doc, "revision": revision}
    return compile_policy(doc, source=source, revision=revision, known_trust_domains=trust_domains)


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0..65535"


def _trust_domain(v: str) -> str | None:
    try:
        parse_trust_domain(v)
    except InvalidValue as exc:
        return exc.reason
    return None


def _upstream_url(v: str) -> str | None:
    if v.startswith("unix:"):
        return None if v[5:].lstrip("/") else "unix: URL needs a socket path (unix:///run/app.sock)"
    if not v.startswith("http://"):
        return "must be http://HOST:PORT or unix:///path/to.sock (the sidecar talks plain HTTP/1.1 to its workload)"
    rest = v[len("http://"):]
    hostport = rest.split("/", 1)[0]
    if "/" in rest and rest.split("/", 1)[1]:
        return "must not have a path: the request path is forwarded as received"
    if not hostport:
        return "has no host"
    return None


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = field(default="0.0.0.0", metadata=meta(nonempty=True, doc="data listener address"))
    port: int = field(default=8443, metadata=meta(check=_port, doc="data listener port (mTLS)"))
    backlog: int = field(default=1024, metadata=meta(min=1, max=65535, doc="listen(2) backlog"))
    tls_min_version: Literal["1.2", "1.3"] = field(default="1.2", metadata=meta(doc="lowest TLS version"))
    handshake_timeout_s: float = field(default=10.0, metadata=meta(min=0.1, doc="TLS handshake limit"))
    header_timeout_s: float = field(default=10.0, metadata=meta(min=0.1, doc="time to receive a request head"))
    idle_timeout_s: float = field(default=60.0, metadata=meta(min=0.1, doc="keep-alive idle limit"))
    max_connections: int = field(default=10000, metadata=meta(min=1, doc="open client connections per worker"))
    max_header_bytes: int = field(default=32768, metadata=meta(min=1024, doc="request line + headers size"))
    max_headers: int = field(default=100, metadata=meta(min=8, max=10000, doc="header count limit"))
    max_request_line_bytes: int = field(default=8192, metadata=meta(min=256, doc="request line size (414 above)"))
    max_body_bytes: int = field(default=64 << 20, metadata=meta(min=0, doc="request body size (413 above; 0 = unlimited)"))


@dataclass(frozen=True, slots=True)
class TrustDomainConfig:
    name: str = field(metadata=meta(check=_trust_domain, doc="trust domain name"))
    bundle_file: str = field(metadata=meta(nonempty=True, doc="bundle file of this trust domain"))
    format: Literal["pem", "spiffe"] = field(default="pem", metadata=meta(doc="pem or spiffe (JWKS)"))


def _unique_trust_domains(tds: tuple[TrustDomainConfig, ...]) -> str | None:
    names = [t.name for t in tds]
    dup = sorted({n for n in names if names.count(n) > 1})
    return f"trust domain listed twice: {', '.join(dup)}" if dup else None


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    svid_file: str = field(metadata=meta(nonempty=True, doc="own X.509-SVID chain (spiffe-helper svid.pem)"))
    svid_key_file: str = field(metadata=meta(nonempty=True, doc="own SVID private key (svid_key.pem)"))
    trust_domains: tuple[TrustDomainConfig, ...] = field(
        metadata=meta(nonempty=True, check=_unique_trust_domains, doc="accepted trust domains"))
    watch_interval_s: float = field(default=2.0, metadata=meta(min=0.05, doc="file poll interval"))
    max_staleness_s: float = field(default=3600.0, metadata=meta(min=0, doc="fail closed after refreshes fail this long (0 = never)"))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = field(metadata=meta(check=_upstream_url, doc="http://HOST:PORT or unix:///path.sock"))
    connect_timeout_s: float = field(default=2.0, metadata=meta(min=0.01, doc="connect limit (502 after)"))
    response_timeout_s: float = field(default=30.0, metadata=meta(min=0.01, doc="time to response head (504 after)"))
    idle_timeout_s: float = field(default=30.0, metadata=meta(min=0.1, doc="pooled connection idle limit"))
    max_idle_connections: int = field(default=128, metadata=meta(min=0, doc="pool size per worker"))


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    spiffe_id: str = field(default="x-portcullis-spiffe-id", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the caller's SPIFFE ID"))
    decision_id: str = field(default="x-portcullis-decision-id", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the decision id"))
    request_id: str = field(default="x-request-id", metadata=meta(pattern=r"[a-z0-9-]+", doc="request id header (propagated or generated)"))
    xfcc: bool = field(default=True, metadata=meta(doc="add X-Forwarded-Client-Cert (Envoy SANITIZE_SET)"))
    subject: str = field(default="x-portcullis-subject", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the token subject"))
    issuer: str = field(default="x-portcullis-issuer", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the token issuer"))
    actor_chain: str = field(default="x-portcullis-actor-chain", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the actor chain, current first"))
    client_id: str = field(default="x-portcullis-client-id", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the token client_id"))


def _https_url_or_none(v: str) -> str | None:
    return None if v.startswith("https://") and len(v) > 8 else "must be an https:// URL"


@dataclass(frozen=True, slots=True)
class BundleConfig:
    url: str | None = field(default=None, metadata=meta(check=_https_url_or_none, doc="control plane bundle URL (OPA bundle protocol, mTLS)"))
    path: str | None = field(default=None, metadata=meta(doc="or a local bundle: a directory or .tar.gz (watched)"))
    public_keys: tuple[str, ...] = field(default=(), metadata=meta(doc="PEM public keys that may sign bundles"))
    require_signature: bool = field(default=True, metadata=meta(doc="refuse unsigned bundles"))
    cache_dir: str | None = field(default=None, metadata=meta(doc="last good bundle kept here, used at start"))
    min_delay_s: float = field(default=10.0, metadata=meta(min=0.05, doc="poll delay, lower bound (jittered)"))
    max_delay_s: float = field(default=20.0, metadata=meta(min=0.05, doc="poll delay, upper bound"))
    long_poll_s: int = field(default=30, metadata=meta(min=0, max=300, doc="long-poll wait (0 = plain polling)"))
    timeout_s: float = field(default=10.0, metadata=meta(min=0.1, doc="request timeout (plus the long-poll wait)"))
    max_bytes: int = field(default=32 << 20, metadata=meta(min=1024, doc="largest bundle accepted"))
    expiry_grace_s: float = field(default=0.0, metadata=meta(min=0, doc="keep an expired bundle this long, then fail closed"))
    server_id: str | None = field(default=None, metadata=meta(doc="expected SPIFFE ID of the control plane"))
    report_status: bool = field(default=True, metadata=meta(doc="POST status to the control plane"))

    def __post_init__(self) -> None:
        if (self.url is None) == (self.path is None):
            raise ValueError("policy.bundle: exactly one of url and path is required")
        if self.require_signature and not self.public_keys:
            raise ValueError("policy.bundle: require_signature needs public_keys "
                             "(set require_signature: false only for development)")
        if self.max_delay_s < self.min_delay_s:
            raise ValueError("policy.bundle: max_delay_s must be >= min_delay_s")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    file: str | None = field(default=None, metadata=meta(doc="policy YAML file (or use bundle)"))
    bundle: BundleConfig | None = field(default=None, metadata=meta(doc="signed policy bundle"))
    mode: Literal["enforce", "shadow"] = field(default="enforce", metadata=meta(doc="shadow: decide and record, let pass"))
    watch_interval_s: float = field(default=2.0, metadata=meta(min=0.05, doc="file poll interval"))
    max_staleness_s: float = field(default=0.0, metadata=meta(min=0, doc="fail closed after refreshes fail this long (0 = never)"))

    def __post_init__(self) -> None:
        if (self.file is None) == (self.bundle is None):
            raise ValueError("policy: exactly one of file and bundle is required")


_JWS_ALGS = ("ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


def _algs(v: tuple[str, ...]) -> str | None:
    bad = [a for a in v if a not in _JWS_ALGS]
    if bad:
        return (f"{', '.join(map(repr, bad))} not accepted: only asymmetric JWS algorithms "
                f"({', '.join(_JWS_ALGS)}); never none or HMAC")
    return None


def _https_url(v: str) -> str | None:
    return None if v.startswith("https://") and len(v) > 8 else "must be an https:// URL"


def _origin(v: str) -> str | None:
    from proxy.core.dpop import normalize_origin

    try:
        normalize_origin(v)
    except (InvalidValue, ValueError, ConfigError) as exc:
        return f"must be a public origin like https://api.example.com[:port] ({exc})"
    return None


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str = field(metadata=meta(nonempty=True, doc="exact iss value"))
    audiences: tuple[str, ...] = field(metadata=meta(nonempty=True, doc="accepted aud values"))
    algorithms: tuple[str, ...] = field(default=("ES256",), metadata=meta(nonempty=True, check=_algs, doc="accepted JWS algorithms"))
    jwks_file: str | None = field(default=None, metadata=meta(doc="JWKS file (watched)"))
    jwks_url: str | None = field(default=None, metadata=meta(check=_https_url, doc="JWKS URL (HTTPS)"))
    jwks_ca_file: str | None = field(default=None, metadata=meta(doc="CA bundle for jwks_url (default: system)"))
    leeway_s: int = field(default=30, metadata=meta(min=0, max=600, doc="clock skew allowed"))
    required_claims: tuple[str, ...] = field(default=("exp", "sub"), metadata=meta(doc="claims that must be present"))
    require_at_jwt_typ: bool = field(default=False, metadata=meta(doc="RFC 9068 typ at+jwt required"))
    max_delegation_depth: int = field(default=8, metadata=meta(min=0, max=64, doc="deepest act chain accepted"))

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError(f"issuer {self.issuer}: exactly one of jwks_file and jwks_url is required")
        if "exp" not in self.required_claims:
            raise ValueError(f"issuer {self.issuer}: required_claims must include exp")


@dataclass(frozen=True, slots=True)
class DPoPSettings:
    public_origin: str | None = field(default=None, metadata=meta(check=_origin, doc="origin callers sign in htu (never taken from Host)"))
    algorithms: tuple[str, ...] = field(default=("ES256", "EdDSA"), metadata=meta(nonempty=True, check=_algs, doc="accepted proof algorithms"))
    iat_window_s: int = field(default=60, metadata=meta(min=1, max=3600, doc="accepted proof age"))
    iat_future_s: int = field(default=5, metadata=meta(min=0, max=300, doc="accepted clock skew ahead"))
    max_proof_bytes: int = field(default=4096, metadata=meta(min=256, doc="largest DPoP header"))
    require_nonce: bool = field(default=False, metadata=meta(doc="require server nonces (RFC 9449 section 9)"))
    nonce_rotate_s: int = field(default=300, metadata=meta(min=10, doc="nonce rotation period"))
    replay_max_entries: int = field(default=250000, metadata=meta(min=100, doc="jti replay store bound: sustained proofs/s = replay_max_entries / (iat_window_s + iat_future_s)"))


@dataclass(frozen=True, slots=True)
class JwtSvidSettings:
    enabled: bool = field(default=False, metadata=meta(doc="accept JWT-SVIDs as workload identity"))
    header: str = field(default="x-jwt-svid", metadata=meta(pattern=r"[a-z0-9-]+", doc="header carrying the JWT-SVID"))
    audiences: tuple[str, ...] = field(default=(), metadata=meta(doc="accepted aud values"))
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=meta(doc="mTLS peers allowed to vouch with a JWT-SVID"))

    def __post_init__(self) -> None:
        if self.enabled and (not self.audiences or not self.trusted_proxies):
            raise ValueError("jwt_svid: enabled needs audiences and trusted_proxies")


@dataclass(frozen=True, slots=True)
class TokensConfig:
    issuers: tuple[IssuerConfig, ...] = field(default=(), metadata=meta(doc="trusted token issuers"))
    cache_max_entries: int = field(default=10000, metadata=meta(min=0, doc="verified tokens kept"))
    max_token_bytes: int = field(default=8192, metadata=meta(min=512, doc="largest access token"))
    forward_token: bool = field(default=False, metadata=meta(doc="forward Authorization/DPoP upstream"))
    jwks_refresh_interval_s: float = field(default=300.0, metadata=meta(min=1, doc="JWKS URL refresh"))
    jwks_min_refresh_interval_s: float = field(default=30.0, metadata=meta(min=0, doc="unknown-kid refresh rate limit"))
    jwks_max_staleness_s: float = field(default=86400.0, metadata=meta(min=0, doc="fail closed after refreshes fail this long"))
    jwks_timeout_s: float = field(default=5.0, metadata=meta(min=0.1, doc="JWKS fetch timeout"))
    jwks_max_bytes: int = field(default=1 << 20, metadata=meta(min=1024, doc="largest JWKS"))
    dpop: DPoPSettings = field(default_factory=DPoPSettings, metadata=meta(doc="DPoP proofs"))
    jwt_svid: JwtSvidSettings = field(default_factory=JwtSvidSettings, metadata=meta(doc="JWT-SVIDs"))

    def __post_init__(self) -> None:
        names = [i.issuer for i in self.issuers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"issuer listed twice: {', '.join(dup)}")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    signing_key_file: str | None = field(default=None, metadata=meta(doc="Ed25519 private key (PKCS8 PEM) for checkpoints"))
    checkpoint_every_records: int = field(default=1000, metadata=meta(min=1, doc="checkpoint every N records"))
    checkpoint_every_s: float = field(default=60.0, metadata=meta(min=0.1, doc="checkpoint every T seconds"))
    queue_max_records: int = field(default=10000, metadata=meta(min=16, doc="records buffered before the sink is full"))
    on_full: Literal["backpressure", "fail_closed"] = field(default="backpressure", metadata=meta(doc="what a full sink does"))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = field(default=True, metadata=meta(doc="serve /healthz /readyz /metrics"))
    address: str = field(default="127.0.0.1", metadata=meta(nonempty=True, doc="admin listener address (plain HTTP)"))
    port: int = field(default=9901, metadata=meta(check=_port, doc="admin listener port"))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    workers: int = field(default=1, metadata=meta(min=1, max=64, doc="worker processes (SO_REUSEPORT)"))
    drain_delay_s: float = field(default=0.0, metadata=meta(min=0, doc="after SIGTERM, keep accepting this long while /readyz is red"))
    drain_timeout_s: float = field(default=20.0, metadata=meta(min=0, doc="max wait for in-flight requests"))
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=meta(doc="stderr log level"))


@dataclass(frozen=True, slots=True)
class Config:
    identity: IdentityConfig = field(metadata=meta(doc="own SVID and trust bundles"))
    upstream: UpstreamConfig = field(metadata=meta(doc="the workload behind the sidecar"))
    policy: PolicyConfig = field(metadata=meta(doc="authorization policy"))
    listener: ListenerConfig = field(default_factory=ListenerConfig, metadata=meta(doc="data listener"))
    headers: HeadersConfig = field(default_factory=HeadersConfig, metadata=meta(doc="identity headers"))
    tokens: TokensConfig = field(default_factory=TokensConfig, metadata=meta(doc="OAuth access tokens, DPoP, JWT-SVIDs"))
    audit: AuditConfig = field(default_factory=AuditConfig, metadata=meta(doc="audit log"))
    admin: AdminConfig = field(default_factory=AdminConfig, metadata=meta(doc="admin listener"))
    server: ServerConfig = field(default_factory=ServerConfig, metadata=meta(doc="process model"))

    @property
    def trust_domain_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.identity.trust_domains)


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> list[Problem]:
    """Apply PORTCULLIS_<SECTION>__<KEY> overrides in place; return problems (bad YAML values)."""
    problems: list[Problem] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__")]
        if any(not k for k in keys):
            problems.append(Problem(f"env {name}", "empty key segment"))
            continue
        try:
            value = yaml_document(env[name]) if env[name] != "" else ""
        except ValueError as exc:
            problems.append(Problem(f"env {name}", f"not a valid YAML value: {exc}"))
            continue
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                problems.append(Problem(f"env {name}", f"{k} is not a section"))
                break
            node = child
        else:
            node[keys[-1]] = value
    return problems


_Identity = TypeVar("_Identity")


def path_resolver(base: Path) -> Callable[[str | None], str | None]:
    """Config file paths are relative to the config file's directory: `r(p)` is `p` made
    absolute against `base` (None stays None)."""
    def r(p: str | None) -> str | None:
        if p is None:
            return None
        path = Path(p)
        return str(path if path.is_absolute() else (base / path))
    return r


def resolve_identity(ident: _Identity, r: Callable[[str | None], str | None]) -> _Identity:
    """An identity section (the sidecar's or the control plane's: `svid_file`, `svid_key_file`,
    `trust_domains`) with those paths resolved by `r` (`path_resolver`)."""
    tds = tuple(dataclasses.replace(t, bundle_file=r(t.bundle_file)) for t in ident.trust_domains)
    return dataclasses.replace(ident, svid_file=r(ident.svid_file),
                               svid_key_file=r(ident.svid_key_file), trust_domains=tds)


def _resolve(cfg: Config, base: Path) -> Config:
    r = path_resolver(base)
    ident = resolve_identity(cfg.identity, r)
    issuers = tuple(dataclasses.replace(i, jwks_file=r(i.jwks_file), jwks_ca_file=r(i.jwks_ca_file))
                    for i in cfg.tokens.issuers)
    bundle = cfg.policy.bundle
    if bundle is not None:
        bundle = dataclasses.replace(bundle, path=r(bundle.path), cache_dir=r(bundle.cache_dir),
                                     public_keys=tuple(r(k) for k in bundle.public_keys))
    return dataclasses.replace(
        cfg, identity=ident, tokens=dataclasses.replace(cfg.tokens, issuers=issuers),
        policy=dataclasses.replace(cfg.policy, file=r(cfg.policy.file), bundle=bundle),
        audit=dataclasses.replace(cfg.audit, signing_key_file=r(cfg.audit.signing_key_file)),
    )


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config text; raise ConfigError with every problem."""
    try:
        data = yaml_document(text)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", source=source)
    problems = apply_env_overrides(data, os.environ if env is None else env)
    try:
        cfg = build(Config, data, source=source)
    except ConfigError as exc:
        raise ConfigError(problems + list(exc.problems), source=source) from None
    if problems:
        raise ConfigError(problems, source=source)
    return _resolve(cfg, base_dir or Path("."))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=str(p)) from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent, env=env)
