"""The sidecar's refreshable inputs (own SVID, trust bundles, policy) and the State built from them.

Rules (DESIGN rules 5 and 6):
- Every input is parsed and validated by a pure core function; the runtime only reads files.
- A State is rebuilt whenever an input changed or the availability verdict changed; the TLS
  context is rebuilt only when the SVID or a trust bundle changed, and the TrustStore version is
  bumped then (per-connection peer verification memos key on it).
- Availability: the own SVID expired, or an input stale past its `max_staleness_s`, makes the
  State `unavailable` (every request 503) and /readyz red. Never-loaded inputs fail the start.
- The policy revision is the document's `revision` when it has one, else `sha256:<12 hex>` of the
  file, so every audit record names exactly which policy decided.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from proxy.config import Config, IssuerConfig, file_revision
from proxy.core.dpop import DPoPConfig, NonceIssuer, normalize_origin
from proxy.core.jose import JWKSet, parse_jwks
from proxy.core.pipeline import IdentityHeaders, State, TokenSettings
from proxy.core.replay import MemoryReplayStore
from proxy.core.tokens import IssuerPolicy, TokenCache
from proxy.core.policy import CompiledPolicy
from proxy.core.spiffe import OwnSvid, TrustBundle, TrustStore, load_own_svid, parse_bundle
from proxy.runtime.metrics import Metrics
from proxy.runtime.bundle_source import BundleSource
from proxy.runtime.policy_load import load_policy
from proxy.runtime.refresher import Refreshable
from proxy.runtime.sources import FileSource

log = logging.getLogger("portcullis.inputs")


def parse_policy_file(data: bytes, digest: str, *, source: str,
                      trust_domains: frozenset[str]) -> CompiledPolicy:
    return load_policy(data, source=source, revision=file_revision(digest),
                       trust_domains=trust_domains)


def issuer_policy(i: IssuerConfig, max_token_bytes: int) -> IssuerPolicy:
    return IssuerPolicy(issuer=i.issuer, audiences=frozenset(i.audiences),
                        algorithms=frozenset(i.algorithms), leeway_s=i.leeway_s,
                        required_claims=frozenset(i.required_claims),
                        require_at_jwt_typ=i.require_at_jwt_typ, max_token_bytes=max_token_bytes,
                        max_delegation_depth=i.max_delegation_depth)


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


class Inputs:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        ident = cfg.identity
        self.svid: Refreshable[OwnSvid] = Refreshable(
            "svid", f"own SVID {ident.svid_file}",
            [FileSource(ident.svid_file), FileSource(ident.svid_key_file)],
            lambda data, _d: load_own_svid(data[0], data[1], time.time()),
            max_staleness_s=ident.max_staleness_s)
        self.bundles: dict[str, Refreshable[TrustBundle]] = {}
        for td in ident.trust_domains:
            self.bundles[td.name] = Refreshable(
                "trust_bundle", f"trust bundle {td.name} ({td.bundle_file})",
                [FileSource(td.bundle_file)],
                lambda data, _d, td=td: parse_bundle(td.name, data[0], td.format),
                max_staleness_s=ident.max_staleness_s)
        tds = cfg.trust_domain_names
        self.bundle: BundleSource | None = None
        if cfg.policy.bundle is not None:
            self.bundle = BundleSource(cfg.policy.bundle, trust_domains=tds,
                                       count=lambda r: metrics.refreshes.inc(("policy", r)))
            self.bundle.max_staleness_s = cfg.policy.max_staleness_s
            self.policy = self.bundle  # type: ignore[assignment]
        else:
            self.policy = Refreshable(
                "policy", f"policy {cfg.policy.file}", [FileSource(cfg.policy.file)],
                lambda data, digests: parse_policy_file(data[0], digests[0],
                                                        source=cfg.policy.file, trust_domains=tds),
                max_staleness_s=cfg.policy.max_staleness_s)
        self.trust_version = 0
        self.state: State | None = None
        # tokens: constant objects (the token cache keys on their identity), keys refreshed
        tok = cfg.tokens
        self.issuer_policies: dict[str, IssuerPolicy] = {i.issuer: issuer_policy(i, tok.max_token_bytes)
                                                         for i in tok.issuers}
        self.jwks_files: dict[str, Refreshable[JWKSet]] = {}
        for i in tok.issuers:
            if i.jwks_file is not None:
                self.jwks_files[i.issuer] = Refreshable(
                    "jwks", f"JWKS of {i.issuer} ({i.jwks_file})", [FileSource(i.jwks_file)],
                    lambda data, _d: parse_jwks(data[0]), max_staleness_s=tok.jwks_max_staleness_s)
        self.remote_jwks: dict = {}  # issuer -> runtime.jwks.RemoteJwks, set up by the worker
        d = tok.dpop
        self.dpop = DPoPConfig(algorithms=frozenset(d.algorithms), iat_window_s=d.iat_window_s,
                               iat_future_s=d.iat_future_s, max_proof_bytes=d.max_proof_bytes,
                               require_nonce=d.require_nonce) if tok.issuers else None
        self.public_origin = normalize_origin(d.public_origin) if d.public_origin else None
        self.token_cache = TokenCache(tok.cache_max_entries) if tok.cache_max_entries else None
        self.replay = MemoryReplayStore(d.replay_max_entries)
        self.nonces = NonceIssuer(os.urandom(32), d.nonce_rotate_s)

    def all(self) -> list[Refreshable]:
        return [self.svid, *self.bundles.values(), self.policy, *self.jwks_files.values()]

    def jwks(self, issuer: str, now: float) -> JWKSet | None:
        """The issuer's keys as currently usable: None when never loaded or stale (the pipeline
        then answers 503 for that issuer's tokens instead of trusting keys it cannot refresh)."""
        src = self.jwks_files.get(issuer) or self.remote_jwks.get(issuer)
        if src is None or src.stale(now):
            return None
        return src.value

    def token_settings(self, now: float) -> TokenSettings:
        return TokenSettings(
            issuers={iss: (pol, self.jwks(iss, now)) for iss, pol in self.issuer_policies.items()},
            dpop=self.dpop, public_origin=self.public_origin, cache=self.token_cache,
            replay=self.replay, nonces=self.nonces,
            require_nonce=self.cfg.tokens.dpop.require_nonce,
            jwt_svid_audiences=frozenset(self.cfg.tokens.jwt_svid.audiences),
            jwt_svid_proxies=frozenset(self.cfg.tokens.jwt_svid.trusted_proxies)
            if self.cfg.tokens.jwt_svid.enabled else frozenset())

    def poll(self, now: float, force: bool = False) -> tuple[bool, bool]:
        """Refresh every input. Returns (anything changed, TLS material changed). Thread-safe with
        respect to the event loop as long as only one poll runs at a time."""
        changed = tls_changed = False
        for r in self.all():
            if r is self.bundle and self.bundle.cfg.url is not None:
                continue  # the control plane client refreshes it (and counts) on its own
            result = r.poll(now, force)
            if r is not self.bundle:  # the bundle source counts its own results
                self.metrics.refreshes.inc((r.source, result))
            if result == "changed":
                changed = True
                if r.source in ("svid", "trust_bundle"):
                    tls_changed = True
        return changed, tls_changed

    def load_errors(self) -> list[str]:
        """Inputs that must load before the worker starts. A control plane bundle is fetched by
        the worker itself (after the admin listener is up), so it is not one of them."""
        return [f"{r.name}: {r.last_error}" for r in self.all()
                if r.value is None and not (r is self.bundle and self.bundle.cfg.url is not None)]

    _FATAL = ("svid", "trust_bundle", "policy")

    def trust_store(self) -> TrustStore:
        self.trust_version += 1
        return TrustStore.of((b.value for b in self.bundles.values()), version=self.trust_version)

    def readiness(self, now: float) -> Readiness:
        reasons = []
        svid = self.svid.value
        if svid is not None and now > svid.not_after:
            reasons.append("svid_expired")
        for r in self.all():
            if r.value is None:
                reasons.append(f"{r.source}_not_loaded")
            elif r.stale(now):
                reasons.append(f"{r.source}_stale")
        if self.bundle is not None and self.bundle.expired(now):
            reasons.append("bundle_expired")
        for iss, remote in self.remote_jwks.items():
            if remote.value is None:
                reasons.append("jwks_not_loaded")
            elif remote.stale(now):
                reasons.append("jwks_stale")
        return Readiness(not reasons, tuple(dict.fromkeys(reasons)))

    def fatal_reason(self, now: float) -> str | None:
        """The first reason every request must fail closed (503): own SVID expired or an SVID,
        trust bundle or policy missing/stale. Issuer keys only fail their own tokens."""
        for reason in self.readiness(now).reasons:
            if reason in ("svid_expired", "bundle_expired") or \
                    reason.split("_")[0] in ("svid", "trust", "policy"):
                return reason
        return None

    def build_state(self, now: float, trust: TrustStore) -> State:
        svid = self.svid.value
        hdrs = self.cfg.headers
        return State(
            trust=trust,
            policy=self.policy.value,  # type: ignore[arg-type]
            mode=self.cfg.policy.mode,
            own_id=str(svid.spiffe_id),  # type: ignore[union-attr]
            identity_headers=IdentityHeaders(spiffe_id=hdrs.spiffe_id, xfcc=hdrs.xfcc,
                                             subject=hdrs.subject, issuer=hdrs.issuer,
                                             actors=hdrs.actor_chain, client_id=hdrs.client_id),
            tokens=self.token_settings(now),
            revocations=self.bundle.revocations if self.bundle is not None else None,
            unavailable=self.fatal_reason(now),
        )

    def update_gauges(self, now: float) -> None:
        m = self.metrics
        oldest: dict[str, float] = {}
        for r in self.all():  # several trust bundles share one label: report the oldest success
            if r.last_success:
                oldest[r.source] = min(oldest.get(r.source, r.last_success), r.last_success)
        for source, ts in oldest.items():
            m.refresh_last_success.set(ts, (source,))
        if self.svid.value is not None:
            m.svid_expiry.set(self.svid.value.not_after)
        if self.policy.value is not None:
            m.policy_info.values.clear()
            m.policy_info.set(1, (self.policy.value.revision,))
