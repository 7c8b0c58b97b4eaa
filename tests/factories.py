"""Test factories: a throw-away PKI on disk (via `proxy.dev`), sidecar configs, policies."""

from __future__ import annotations

import socket
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from proxy.dev.ca import DevCA, DevSvid, generate_ed25519_keypair

TD = "example.org"
PARTNER_TD = "partner.org"
SIDECAR_ID = f"spiffe://{TD}/ns/demo/sa/sidecar"
FRONTEND_ID = f"spiffe://{TD}/ns/demo/sa/frontend"
BATCH_ID = f"spiffe://{TD}/ns/demo/sa/batch"
PARTNER_ID = f"spiffe://{PARTNER_TD}/billing"

DEFAULT_POLICY = {
    "version": 1,
    "rules": [
        {"id": "frontend-api", "effect": "allow",
         "from": {"workloads": [FRONTEND_ID]},
         "to": [{"paths": ["/**"]}]},
        {"id": "partner-billing", "effect": "allow",
         "from": {"workloads": [f"spiffe://{PARTNER_TD}/**"]},
         "to": [{"methods": ["GET"], "paths": ["/billing/**"]}]},
        {"id": "batch-admin-deny", "effect": "deny",
         "from": {"workloads": [BATCH_ID]},
         "to": [{"paths": ["/admin/**"]}]},
        {"id": "batch-reports", "effect": "allow",
         "from": {"workloads": [BATCH_ID]},
         "to": [{"methods": ["GET"], "paths": ["/reports/{id}"]}]},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Client:
    """A workload's SVID on disk, ready for curl (--cert/--key) or ssl contexts."""

    name: str
    dir: Path
    svid: DevSvid | None = None

    @property
    def cert(self) -> str:
        return str(self.dir / "svid.pem")

    @property
    def key(self) -> str:
        return str(self.dir / "svid_key.pem")


@dataclass
class Pki:
    root: Path
    ca: DevCA
    partner_ca: DevCA
    rogue_ca: DevCA
    clients: dict[str, Client] = field(default_factory=dict)

    @property
    def sidecar_dir(self) -> Path:
        return self.root / "sidecar"

    @property
    def bundle(self) -> str:
        """What a client uses to verify the sidecar (curl --cacert); a separate copy, so tests can
        break the sidecar's own bundle files."""
        return str(self.root / "client-ca.pem")

    def client(self, name: str) -> Client:
        return self.clients[name]

    def issue(self, name: str, spiffe_id: str | None, ca: DevCA | None = None, **kw) -> Client:
        ca = ca or self.ca
        svid = ca.issue_svid(spiffe_id, **kw)
        d = self.root / "clients" / name
        svid.write(d, bundle_pem=self.ca.bundle_pem())
        c = Client(name, d, svid)
        self.clients[name] = c
        return c


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = DevCA.create(TD)
    partner = DevCA.create(PARTNER_TD)
    rogue = DevCA.create(TD, common_name="rogue example.org root")
    pki = Pki(root, ca, partner, rogue)
    (root / "bundles").mkdir(exist_ok=True)
    (root / "bundles" / f"{TD}.pem").write_bytes(ca.bundle_pem())
    (root / "bundles" / f"{PARTNER_TD}.pem").write_bytes(partner.bundle_pem())
    (root / "client-ca.pem").write_bytes(ca.bundle_pem())
    ca.issue_svid(SIDECAR_ID).write(pki.sidecar_dir, bundle_pem=ca.bundle_pem())
    pki.issue("frontend", FRONTEND_ID)
    pki.issue("batch", BATCH_ID)
    pki.issue("partner", PARTNER_ID, ca=partner)
    pki.issue("rogue", FRONTEND_ID, ca=rogue)  # right name, untrusted CA
    pki.issue("cross", PARTNER_ID, ca=ca)  # partner's ID vouched for by example.org's CA
    priv, pub = generate_ed25519_keypair()
    (root / "audit.key").write_bytes(priv)
    (root / "audit.pub").write_bytes(pub)
    return pki


def write_config(pki: Pki, *, upstream_url: str, port: int = 0, admin_port: int = 0,
                 policy: dict | None = None, extra: dict | None = None,
                 name: str = "sidecar.yaml") -> Path:
    root = pki.root
    (root / "policy.yaml").write_text(yaml.safe_dump(policy or DEFAULT_POLICY, sort_keys=False))
    cfg = {
        "listener": {"address": "127.0.0.1", "port": port},
        "identity": {
            "svid_file": "sidecar/svid.pem",
            "svid_key_file": "sidecar/svid_key.pem",
            "trust_domains": [
                {"name": TD, "bundle_file": f"bundles/{TD}.pem"},
                {"name": PARTNER_TD, "bundle_file": f"bundles/{PARTNER_TD}.pem"},
            ],
            "watch_interval_s": 0.1,
        },
        "upstream": {"url": upstream_url, "response_timeout_s": 2.0, "connect_timeout_s": 1.0},
        "policy": {"file": "policy.yaml", "watch_interval_s": 0.1},
        "audit": {"signing_key_file": "audit.key", "checkpoint_every_records": 50,
                  "checkpoint_every_s": 60},
        "admin": {"address": "127.0.0.1", "port": admin_port},
        "server": {"drain_timeout_s": 5},
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip()
