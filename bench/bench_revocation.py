"""Benchmark: how long a revocation takes to reach every long-polling client of the control plane.

Usage: python bench/bench_revocation.py [--clients 20] [--reps 5] [--wait-s 30] [--keep]

Starts `portcullis control-plane serve` in its own process (uvloop, mTLS on 127.0.0.1, a throw-away
dev CA, the shipped config/controlplane-policy.yaml) and N long-polling bundle clients in this
process, each with its own X.509-SVID and its own connection (`GET /bundles/demo`, If-None-Match,
`Prefer: wait=S`, as a sidecar's bundle client would). Once every client is parked (the control
plane's `long_polls_waiting` says so), the deployer posts one revocation; each client records when
it holds the new revision (response body read). Per repetition it prints the time of the POST
itself (validate, sign, fsync) and the median / max over clients of POST-sent -> new revision held;
then the median of the per-repetition medians and the worst max. A script: no asserts.
`--sidecars N` (default 3) of the clients are real `portcullis serve` processes following the
control plane; for them the latency runs until their active policy revision (read on /readyz)
is the new one, i.e. until they enforce the revocation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

from proxy.dev.ca import DevCA, new_key  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

TD = "example.org"
DEPLOYER = f"spiffe://{TD}/ns/platform/sa/deployer"
POLICY = {"version": 1, "rules": [{"id": "all-demo", "effect": "allow",
                                   "from": {"workloads": [f"spiffe://{TD}/ns/demo/**"]},
                                   "to": [{"paths": ["/**"]}]}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(root: Path, clients: int, port: int) -> tuple[Path, list[Path], Path]:
    ca = DevCA.create(TD)
    (root / "bundle.pem").write_bytes(ca.bundle_pem())
    ca.issue_svid(f"spiffe://{TD}/ns/platform/sa/controlplane").write(root / "cp")
    ca.issue_svid(DEPLOYER).write(root / "deployer")
    dirs = []
    for i in range(clients):
        d = root / "clients" / f"w{i}"
        ca.issue_svid(f"spiffe://{TD}/ns/demo/sa/w{i}").write(d)
        dirs.append(d)
    key = new_key("ed25519")
    (root / "signing.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (root / "signing.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    src = root / "src"
    (src / "data").mkdir(parents=True)
    (src / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    cfg = {
        "listener": {"address": "127.0.0.1", "port": port},
        "identity": {"svid_file": "cp/svid.pem", "svid_key_file": "cp/svid_key.pem",
                     "trust_domains": [{"name": TD, "bundle_file": "bundle.pem"}]},
        "signing": {"key_file": "signing.key"},
        "state": {"dir": "state", "keep_revisions": 5},
        "policy": {"file": str(ROOT / "config" / "controlplane-policy.yaml")},
        "bundles": [{"name": "demo", "source_dir": "src"}],
        "long_poll": {"max_wait_s": 60},
        "log_level": "warning",
    }
    path = root / "cp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, dirs, root / "deployer"


def ssl_for(svid_dir: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(bundle)
    ctx.load_cert_chain(svid_dir / "svid.pem", svid_dir / "svid_key.pem")
    return ctx


class Poller:
    """One long-polling client: remembers when it first held each revision."""

    def __init__(self, session: aiohttp.ClientSession, url: str, wait_s: int) -> None:
        self.session, self.url, self.wait_s = session, url, wait_s
        self.etag: str | None = None
        self.revision = 0
        self.got: dict[int, float] = {}

    async def run(self) -> None:
        while True:
            headers = {"Prefer": f"wait={self.wait_s}"}
            if self.etag:
                headers["If-None-Match"] = self.etag
            async with self.session.get(self.url, headers=headers) as r:
                if r.status == 200:
                    await r.read()
                    self.etag = r.headers["ETag"]
                    self.revision = int(r.headers["X-Bundle-Revision"])
                    self.got[self.revision] = time.perf_counter()
                elif r.status != 304:
                    raise RuntimeError(f"bundle fetch answered {r.status}: {await r.text()}")


async def wait_until(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


async def bench(args: argparse.Namespace, root: Path) -> None:
    port = free_port()
    cfg_path, client_dirs, deployer_dir = setup(root, args.clients, port)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from proxy.controlplane.cli import main_serve; "
                               "sys.exit(main_serve(sys.argv[1]))", str(cfg_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    bundle = root / "bundle.pem"
    base = f"https://127.0.0.1:{port}"
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=ssl_for(deployer_dir, bundle)))
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_for(d, bundle)))
                for d in client_dirs[args.sidecars:]]
    admin_probe = aiohttp.ClientSession()
    tasks: list[asyncio.Task] = []
    try:
        async def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"control plane exited with {proc.returncode}")
            try:
                async with admin.get(f"{base}/v1/bundles/demo") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up)
        pollers = [Poller(s, f"{base}/bundles/demo", args.wait_s) for s in sessions]
        tasks = [asyncio.create_task(p.run()) for p in pollers]

        async def parked() -> bool:
            for t in tasks:
                if t.done():
                    t.result()
            async with admin.get(f"{base}/v1/bundles/demo") as r:
                listing = await r.json()
            return (all(p.revision == listing["current"]["revision"] for p in pollers)
                    and listing["long_polls_waiting"] >= len(pollers))

        sidecars = start_sidecars(root, client_dirs[:args.sidecars], base, bundle)
        for sc in sidecars:
            async def has_policy(sc=sc) -> bool:
                return (await sidecar_revision(sc, admin_probe)) is not None
            await wait_until(has_policy, 60)

        print(f"control plane pid {proc.pid}, {args.clients} long-polling clients "
              f"({len(sidecars)} of them real sidecars), {args.reps} repetitions")
        medians, maxes, posts, sidecar_maxes = [], [], [], []
        for rep in range(args.reps):
            await wait_until(parked)
            t0 = time.perf_counter()
            async with admin.post(f"{base}/v1/bundles/demo/revocations",
                                  json={"jtis": [f"bench-{rep}-{os.urandom(4).hex()}"]}) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"revocation answered {r.status}: {body}")
            t_post = time.perf_counter() - t0
            new = body["revision"]
            await wait_until(lambda: _all_have(pollers, new))
            lat = sorted((p.got[new] - t0) * 1000 for p in pollers)
            sc_lat = []
            for sc in sidecars:  # a real sidecar has it when its active policy revision moved
                while (await sidecar_revision(sc, admin_probe)) != f"demo@{new}":
                    await asyncio.sleep(0.002)
                sc_lat.append((time.perf_counter() - t0) * 1000)
            if sc_lat:
                sidecar_maxes.append(max(sc_lat))
            medians.append(statistics.median(lat))
            maxes.append(lat[-1])
            posts.append(t_post * 1000)
            print(f"  rep {rep + 1}: revision {new}: POST {t_post * 1000:7.2f} ms | "
                  f"all {len(lat)} clients: median {medians[-1]:7.2f} ms, max {lat[-1]:7.2f} ms"
                  + (f" | every sidecar enforcing it: {max(sc_lat):7.2f} ms" if sc_lat else ""))
        print(f"summary: POST median {statistics.median(posts):.2f} ms; revocation -> every "
              f"client: median of medians {statistics.median(medians):.2f} ms, "
              f"median of maxes {statistics.median(maxes):.2f} ms, worst {max(maxes):.2f} ms")
        if sidecar_maxes:
            print(f"real sidecars enforcing the revocation (active revision, read on /readyz): "
                  f"median {statistics.median(sidecar_maxes):.2f} ms, worst {max(sidecar_maxes):.2f} ms")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sc in locals().get("sidecars", []):
            sc["proc"].terminate()
        for sc in locals().get("sidecars", []):
            try:
                sc["proc"].wait(10)
            except subprocess.TimeoutExpired:
                sc["proc"].kill()
        for s in [admin, *sessions, admin_probe]:
            await s.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_sidecars(root: Path, dirs: list[Path], base: str, bundle: Path) -> list[dict]:
    """Real sidecars (`portcullis serve`) following the control plane with long polling."""
    out = []
    for d in dirs:
        admin = free_port()
        cfg = {
            "listener": {"address": "127.0.0.1", "port": free_port()},
            "identity": {"svid_file": str(d / "svid.pem"), "svid_key_file": str(d / "svid_key.pem"),
                         "trust_domains": [{"name": TD, "bundle_file": str(bundle)}]},
            "upstream": {"url": "http://127.0.0.1:9"},
            "policy": {"bundle": {"url": f"{base}/bundles/demo",
                                  "public_keys": [str(root / "signing.pub")],
                                  "cache_dir": str(d / "cache"), "long_poll_s": 30}},
            "admin": {"address": "127.0.0.1", "port": admin},
            "server": {"log_level": "warning"},
        }
        path = d / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                                cwd=ROOT, stdout=subprocess.DEVNULL)
        out.append({"proc": proc, "admin": admin})
    return out


async def sidecar_revision(sc: dict, session: aiohttp.ClientSession) -> str | None:
    if sc["proc"].poll() is not None:
        raise RuntimeError(f"a sidecar exited with {sc['proc'].returncode}")
    try:
        async with session.get(f"http://127.0.0.1:{sc['admin']}/readyz") as r:
            return (await r.json()).get("policy_revision")
    except (aiohttp.ClientError, ValueError):
        return None


async def _all_have(pollers: list[Poller], revision: int) -> bool:
    return all(revision in p.got for p in pollers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--sidecars", type=int, default=3,
                    help="how many of the clients are real sidecars (portcullis serve)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--wait-s", type=int, default=30, help="Prefer: wait=<s> of each long poll")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="portcullis-bench-revocation-"))
    try:
        uvloop.run(bench(args, root))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
