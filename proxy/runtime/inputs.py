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
import time
from dataclasses import dataclass

import yaml

from proxy.config import Config
from proxy.core.pipeline import IdentityHeaders, State
from proxy.core.policy import CompiledPolicy, compile_policy
from proxy.core.spiffe import OwnSvid, TrustBundle, TrustStore, load_own_svid, parse_bundle
from proxy.errors import ConfigError
from proxy.runtime.metrics import Metrics
from proxy.runtime.refresher import Refreshable
from proxy.runtime.sources import FileSource

log = logging.getLogger("portcullis.inputs")


def parse_policy_file(data: bytes, digest: str, *, source: str,
                      trust_domains: frozenset[str]) -> CompiledPolicy:
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    return compile_policy(doc, source=source, revision=f"sha256:{digest[:12]}",
                          known_trust_domains=trust_domains)


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
        self.policy: Refreshable[CompiledPolicy] = Refreshable(
            "policy", f"policy {cfg.policy.file}", [FileSource(cfg.policy.file)],
            lambda data, digests: parse_policy_file(data[0], digests[0], source=cfg.policy.file,
                                                    trust_domains=tds),
            max_staleness_s=cfg.policy.max_staleness_s)
        self.trust_version = 0
        self.state: State | None = None

    def all(self) -> list[Refreshable]:
        return [self.svid, *self.bundles.values(), self.policy]

    def poll(self, now: float, force: bool = False) -> tuple[bool, bool]:
        """Refresh every input. Returns (anything changed, TLS material changed). Thread-safe with
        respect to the event loop as long as only one poll runs at a time."""
        changed = tls_changed = False
        for r in self.all():
            result = r.poll(now, force)
            self.metrics.refreshes.inc((r.source, result))
            if result == "changed":
                changed = True
                if r.source in ("svid", "trust_bundle"):
                    tls_changed = True
        return changed, tls_changed

    def load_errors(self) -> list[str]:
        return [f"{r.name}: {r.last_error}" for r in self.all() if r.value is None]

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
        return Readiness(not reasons, tuple(dict.fromkeys(reasons)))

    def build_state(self, now: float, trust: TrustStore) -> State:
        svid = self.svid.value
        readiness = self.readiness(now)
        hdrs = self.cfg.headers
        return State(
            trust=trust,
            policy=self.policy.value,  # type: ignore[arg-type]
            mode=self.cfg.policy.mode,
            own_id=str(svid.spiffe_id),  # type: ignore[union-attr]
            identity_headers=IdentityHeaders(spiffe_id=hdrs.spiffe_id, xfcc=hdrs.xfcc,
                                             subject=hdrs.subject, issuer=hdrs.issuer,
                                             actors=hdrs.actor_chain, client_id=hdrs.client_id),
            unavailable=None if readiness.ready else readiness.reasons[0],
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
