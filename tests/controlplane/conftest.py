"""Fixtures for the control plane: a throw-away PKI (tests.factories), a real control plane on
127.0.0.1 serving mTLS, and aiohttp clients holding SVIDs."""

from __future__ import annotations

import asyncio
import ssl
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.dev.volumes import targz
from proxy.controlplane.config import load_config
from proxy.controlplane.server import ControlPlane
from proxy.dev.ca import new_key
from tests.factories import DEFAULT_POLICY, PARTNER_TD, TD, Client, Pki

REPO = Path(__file__).resolve().parents[2]
CP_POLICY = REPO / "config" / "controlplane-policy.yaml"

CP_ID = f"spiffe://{TD}/ns/platform/sa/controlplane"
DEPLOYER_ID = f"spiffe://{TD}/ns/platform/sa/deployer"
OTHER_NS_ID = f"spiffe://{TD}/ns/billing/sa/api"  # may report status, may not fetch "demo"


class Clock:
    """An injectable clock: real time plus a settable offset, or frozen at one instant."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = None

    def freeze(self) -> None:
        self.frozen = time.time()

    def __call__(self) -> float:
        return (time.time() if self.frozen is None else self.frozen) + self.offset


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def source_targz(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    """A tar.gz of a source directory, as `tar -czf src.tgz -C dir .` would make it."""
    return targz(files, extra=extra)


def policy_bytes(policy: dict | None = None) -> bytes:
    return yaml.safe_dump(policy or DEFAULT_POLICY, sort_keys=False).encode()


@dataclass
class RunningCP:
    cp: ControlPlane
    config_path: Path
    pki: Pki
    audit: list[bytes] = field(default_factory=list)
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.cp.port is not None
        return self.cp.port

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def session(self, client: Client | None) -> aiohttp.ClientSession:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(self.pki.bundle)
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
                                  timeout=aiohttp.ClientTimeout(total=30))
        self.sessions.append(s)
        return s

    def audit_records(self) -> list[dict]:
        return [orjson.loads(line) for line in self.audit]

    async def wait_waiting(self, bundle: str, n: int) -> None:
        """Until `n` long polls are parked on `bundle` (synchronisation, not a timing check)."""
        slot = self.cp.store.slot(bundle)
        for _ in range(2000):
            if slot.waiting >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {slot.waiting} of {n} long polls parked")

    async def stop(self) -> None:
        for s in self.sessions:
            await s.close()
        self.sessions.clear()
        await self.cp.stop()


@dataclass
class CpEnv:
    """What one test's control planes share: PKI, keys, source dir, state dir."""

    pki: Pki
    root: Path
    clock: Clock
    running: list[RunningCP] = field(default_factory=list)

    @property
    def source_dir(self) -> Path:
        return self.root / "src"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def write_signing_key(self, name: str = "signing.key", key_type: str = "ed25519") -> Path:
        key = new_key(key_type)
        path = self.root / name
        path.write_bytes(key_pem(key))
        path.chmod(0o600)
        (self.root / (name + ".pub")).write_bytes(public_pem(key))
        return path

    def write_source(self, policy: dict | None = None, revocations: dict | None = None) -> Path:
        d = self.source_dir
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "policy.yaml").write_bytes(policy_bytes(policy))
        if revocations is not None:
            (d / "data" / "revocations.json").write_bytes(orjson.dumps(revocations))
        return d

    def write_config(self, *, name: str = "cp.yaml", bundles: list | None = None,
                     extra: dict | None = None, signing: dict | None = None) -> Path:
        cfg = {
            "listener": {"address": "127.0.0.1", "port": 0},
            "identity": {
                "svid_file": str(self.root / "cp" / "svid.pem"),
                "svid_key_file": str(self.root / "cp" / "svid_key.pem"),
                "trust_domains": [
                    {"name": TD, "bundle_file": str(self.pki.root / "bundles" / f"{TD}.pem")},
                    {"name": PARTNER_TD,
                     "bundle_file": str(self.pki.root / "bundles" / f"{PARTNER_TD}.pem")},
                ],
                "watch_interval_s": 0.1,
            },
            "signing": signing or {"key_file": str(self.root / "signing.key")},
            "state": {"dir": str(self.state_dir), "keep_revisions": 10},
            "policy": {"file": str(CP_POLICY)},
            "bundles": bundles if bundles is not None else [
                {"name": "demo", "source_dir": str(self.source_dir)}, {"name": "empty"}],
            "long_poll": {"max_wait_s": 30},
        }
        for section, values in (extra or {}).items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        path = self.root / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def make(self, config_path: Path | None = None) -> RunningCP:
        path = config_path or self.write_config()
        audit: list[bytes] = []
        cp = ControlPlane(load_config(path, env={}), clock=self.clock, audit_out=audit.append)
        return RunningCP(cp, path, self.pki, audit)

    async def start(self, config_path: Path | None = None) -> RunningCP:
        rc = self.make(config_path)
        rc.cp.load()
        await rc.cp.start()
        self.running.append(rc)
        return rc


@pytest.fixture
async def env(pki: Pki, tmp_path: Path):
    root = tmp_path / "cp"
    root.mkdir()
    pki.ca.issue_svid(CP_ID).write(root / "cp", bundle_pem=pki.ca.bundle_pem())
    pki.issue("deployer", DEPLOYER_ID)
    pki.issue("other", OTHER_NS_ID)
    e = CpEnv(pki, root, Clock())
    e.write_signing_key()
    e.write_source()
    yield e
    for rc in e.running:
        await rc.stop()


@pytest.fixture
async def cp(env: CpEnv) -> RunningCP:
    return await env.start()
