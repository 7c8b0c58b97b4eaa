"""`make soak`: Portcullis under steady mTLS load while everything it depends on changes.

What runs (all on 127.0.0.1, in a temporary directory; see soak/README.md):
- a control plane (`portcullis control-plane serve`, a subprocess) serving signed bundle "demo";
  the deployer talks to it with curl (mTLS), as an operator would;
- the sidecar (`portcullis serve`, a subprocess) following it (signed bundles, long polling, a
  last-good cache), its own SVID and trust bundle in a Kubernetes-style projected volume
  (`..data` symlink swaps), its audit log on stdout redirected to a file;
- a real HTTP/1.1 upstream (in this process) that records every request it receives;
- an open-loop load of mTLS clients (aiohttp) at `--rate` requests per second: workloads the
  policy allows, one it denies, one it allows in some revisions only, one that gets revoked and
  un-revoked, an agent with DPoP-bound tokens (`proxy.dev.tokens`), and a workload holding a
  stolen token without its DPoP key.

What changes during the run (times are fractions of `--duration`):
  0.08 publish policy P2 (batch may read reports)        0.16 trust bundle: CA1 -> CA1+CA2
  0.24 the sidecar's SVID re-issued by CA2               0.30 clients move to CA2-issued SVIDs
  0.50 revoke the "reporting" workload (and never before the sidecar's FIRST SVID has expired:
       bundles must keep arriving after it, so the control plane client must use the new SVID)
  0.66 publish policy P1 again (revocation kept)         0.80 remove the revocation
  0.90 the sidecar's SVID renewed again (CA2)
Events keep at least 2 s apart; the load runs until `--duration` or 3 s after the last event.

Every request records the state the client could expect (the bundle revisions that were current
from `--convergence-s` before it started until it ended: a bounded, explicit convergence window
around each change) and what it got. At the end (SIGTERM, drain, exit 0), the run fails on:
- failed authorised requests: the only acceptable answer was 200 and it was not (or no answer);
- authorised-by-mistake requests: a request that had to be refused reached the upstream
  (checked in the upstream's own record, not only the status) or got 200;
- any other answer outside the set the acceptable revisions give, any transport error;
- a decision inconsistent with the revision the audit record says decided it, or decided by a
  revision outside the window;
- audit decision records != requests answered (each answered request exactly once), records for
  unknown requests, `portcullis audit verify --public-key` not OK, no final checkpoint;
- a non-zero sidecar exit, a traceback in its log, a control plane operation that failed.
Exit status: 0 all checks passed, 1 a check failed, 2 the harness could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httptools
import uvloop
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.dev.ca import DevCA, generate_ed25519_keypair  # noqa: E402
from proxy.dev.volumes import projected_swap, targz  # noqa: E402
from proxy.dev.tokens import (create_dpop_key, create_issuer, load_private_key,  # noqa: E402
                              mint_access_token, mint_dpop_proof)

HOST = "127.0.0.1"
TD = "example.org"
ISS = "https://idp.example.org"
AUD = "https://orders.example.org"


def sid(name: str, ns: str = "demo") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


SIDECAR_ID = sid("orders")
CP_ID = sid("controlplane", "platform")
DEPLOYER_ID = sid("deployer", "platform")
IDS = {"frontend": sid("frontend"), "batch": sid("batch"), "reporting": sid("reporting"),
       "agent": sid("agent"), "intruder": sid("intruder", "other")}
REVOKED = "reporting"
MOVE_TO_CA2 = ("frontend", "batch", "agent")  # the others keep their CA1 SVIDs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# The policies and what each kind of request must get under them


def policy_doc(batch_reads_reports: bool) -> dict:
    rules = [
        {"id": "frontend-orders", "effect": "allow", "from": {"workloads": [IDS["frontend"]]},
         "to": [{"methods": ["GET", "POST"], "paths": ["/api/orders", "/api/orders/**"]}]},
        {"id": "batch-no-admin", "effect": "deny", "from": {"workloads": [IDS["batch"]]},
         "to": [{"paths": ["/api/admin/**"]}]},
        {"id": "reporting-reads-reports", "effect": "allow",
         "from": {"workloads": [IDS["reporting"]]},
         "to": [{"methods": ["GET"], "paths": ["/api/reports/{id}"]}]},
        {"id": "alice-via-agent", "effect": "allow",
         "from": {"subjects": [{"issuer": ISS, "sub": "alice"}], "actors": [IDS["agent"]]},
         "require": {"peer_is": "actor", "max_delegation_depth": 2},
         "to": [{"methods": ["POST"], "paths": ["/api/invoices/{id}/approve"]}]},
    ]
    if batch_reads_reports:
        rules.append({"id": "batch-reads-reports", "effect": "allow",
                      "from": {"workloads": [IDS["batch"]]},
                      "to": [{"methods": ["GET"], "paths": ["/api/reports/{id}"]}]})
    return {"version": 1,
            "authentication": [{"paths": ["/api/invoices/**"], "token": "required",
                                "binding": "dpop"}],
            "rules": rules}


POLICIES = {"P1": policy_doc(False), "P2": policy_doc(True)}


@dataclass(frozen=True)
class Kind:
    name: str
    who: str  # key of IDS
    method: str
    path: str  # "{n}" is replaced by a number
    weight: int
    expect: dict  # policy name -> status
    auth: str | None = None  # None | "dpop" | "stolen" | "no-proof"


KINDS = (
    Kind("frontend-read", "frontend", "GET", "/api/orders/{n}", 20, {"P1": 200, "P2": 200}),
    Kind("frontend-order", "frontend", "POST", "/api/orders", 6, {"P1": 200, "P2": 200}),
    Kind("batch-report", "batch", "GET", "/api/reports/{n}", 14, {"P1": 403, "P2": 200}),
    Kind("batch-admin", "batch", "GET", "/api/admin/users", 5, {"P1": 403, "P2": 403}),
    Kind("reporting", "reporting", "GET", "/api/reports/{n}", 16, {"P1": 200, "P2": 200}),
    Kind("intruder", "intruder", "GET", "/api/orders/{n}", 5, {"P1": 403, "P2": 403}),
    Kind("agent-dpop", "agent", "POST", "/api/invoices/{n}/approve", 20, {"P1": 200, "P2": 200},
         "dpop"),
    Kind("agent-no-proof", "agent", "POST", "/api/invoices/{n}/approve", 4,
         {"P1": 401, "P2": 401}, "no-proof"),
    Kind("agent-no-token", "agent", "POST", "/api/invoices/{n}/approve", 3,
         {"P1": 401, "P2": 401}),
    # a workload with a valid SVID of another identity replays alice's token with its own key
    Kind("stolen-token", "intruder", "POST", "/api/invoices/{n}/approve", 4,
         {"P1": 401, "P2": 401}, "stolen"),
)


def expected_status(kind: Kind, content: tuple[str, frozenset]) -> int:
    policy, revoked = content
    if kind.who in revoked:
        return 403
    return kind.expect[policy]


# ------------------------------------------------------------------------------------------------
# The upstream: records exactly what reached it


@dataclass
class Seen:
    method: str
    path: str
    spiffe_id: str | None
    subject: str | None


class Upstream:
    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}
        self.unknown = 0  # requests without our request id
        self.duplicates = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpConn(self), HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class _UpConn(asyncio.Protocol):
    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.headers: dict[bytes, bytes] = {}
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.headers, self.url = {}, b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        h = self.headers
        rid = h.get(b"x-request-id", b"").decode("latin-1")
        method = self.parser.get_method().decode()
        seen = Seen(method, self.url.decode("latin-1").split("?")[0],
                    h.get(b"x-portcullis-spiffe-id", b"").decode() or None,
                    h.get(b"x-portcullis-subject", b"").decode() or None)
        if not rid.startswith("soak-"):
            self.up.unknown += 1
        elif rid in self.up.seen:
            self.up.duplicates += 1
        else:
            self.up.seen[rid] = seen
        body = b'{"ok":true}'
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (len(body), body))


# ------------------------------------------------------------------------------------------------
# Files: PKI, projected volume, configs


def k8s_swap(base: Path, files: dict[str, bytes], version: str) -> None:
    projected_swap(base, files, version, mode=0o600)


def cert_sha256(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def source_targz(policy: str, revoked: frozenset) -> bytes:
    files = {"policy.yaml": yaml.safe_dump(POLICIES[policy], sort_keys=False).encode()}
    if revoked:
        files["data/revocations.json"] = json.dumps(
            {"spiffe_ids": sorted(IDS[w] for w in revoked)}).encode()
    return targz(files)


@dataclass
class World:
    d: Path
    ca1: DevCA
    ca2: DevCA
    port: int
    admin: int
    cp_port: int
    svid1_not_after: float = 0.0
    svid1_sha256: str = ""

    @property
    def volume(self) -> Path:
        return self.d / "spiffe"

    def client_dir(self, who: str, gen: int) -> Path:
        return self.d / "clients" / f"{who}-ca{gen}"


def make_world(d: Path, duration: float, long_poll_s: int) -> World:
    ca1 = DevCA.create(TD, common_name="example.org root 1")
    ca2 = DevCA.create(TD, common_name="example.org root 2")
    w = World(d, ca1, ca2, free_port(), free_port(), free_port())
    (d / "both-cas.pem").write_bytes(ca1.bundle_pem() + ca2.bundle_pem())
    for who, spiffe_id in IDS.items():
        for gen, ca in ((1, ca1), (2, ca2)):
            ca.issue_svid(spiffe_id, ttl_s=int(duration) + 3600).write(w.client_dir(who, gen))
    for gen, ca in ((1, ca1), (2, ca2)):
        ca.issue_svid(DEPLOYER_ID, ttl_s=int(duration) + 3600).write(d / f"deployer-ca{gen}")
    # control plane: SVID (CA1), its own trust bundle file, signing key, source, state
    ca1.issue_svid(CP_ID, ttl_s=int(duration) + 3600).write(d / "cp")
    (d / "cp" / "trust.pem").write_bytes(ca1.bundle_pem())
    priv, pub = generate_ed25519_keypair()
    (d / "cp" / "signing.key").write_bytes(priv)
    os.chmod(d / "cp" / "signing.key", 0o600)
    (d / "cp" / "signing.pub").write_bytes(pub)
    (d / "src").mkdir()
    (d / "src" / "policy.yaml").write_text(yaml.safe_dump(POLICIES["P1"], sort_keys=False))
    (d / "cp.yaml").write_text(yaml.safe_dump({
        "listener": {"address": HOST, "port": w.cp_port},
        "identity": {"svid_file": str(d / "cp" / "svid.pem"),
                     "svid_key_file": str(d / "cp" / "svid_key.pem"),
                     "trust_domains": [{"name": TD, "bundle_file": str(d / "cp" / "trust.pem")}],
                     "watch_interval_s": 0.5},
        "signing": {"key_file": str(d / "cp" / "signing.key")},
        "state": {"dir": str(d / "cp" / "state"), "keep_revisions": 20},
        "policy": {"file": str(REPO / "config" / "controlplane-policy.yaml")},
        "bundles": [{"name": "demo", "source_dir": str(d / "src")}],
        "long_poll": {"max_wait_s": 30},
        "audit": {"sidecar_requests": True},
    }, sort_keys=False))
    # tokens: a dev issuer (`portcullis dev issuer` does the same), the agent's DPoP key, a thief's
    issuer = create_issuer(d / "idp")
    (d / "idp" / "kid").write_text(issuer["kid"])
    create_dpop_key(d / "agent-dpop.key")
    create_dpop_key(d / "thief-dpop.key")
    # audit signing key
    priv, pub = generate_ed25519_keypair()
    (d / "audit.key").write_bytes(priv)
    os.chmod(d / "audit.key", 0o600)
    (d / "audit.pub").write_bytes(pub)
    # the sidecar's projected volume: its FIRST SVID is short-lived (expires mid-run)
    now = time.time()
    first = ca1.issue_svid(SIDECAR_ID, now=now, ttl_s=int(0.36 * duration + 10))
    w.svid1_not_after = first.cert.not_valid_after_utc.timestamp()
    w.svid1_sha256 = cert_sha256(first.cert)
    k8s_swap(w.volume, {"svid.pem": first.cert_pem(), "svid_key.pem": first.key_pem(),
                        "bundle.pem": ca1.bundle_pem()}, "v1")
    (d / "sidecar.yaml").write_text(yaml.safe_dump({
        "listener": {"address": HOST, "port": w.port},
        "identity": {"svid_file": str(w.volume / "svid.pem"),
                     "svid_key_file": str(w.volume / "svid_key.pem"),
                     "trust_domains": [{"name": TD, "bundle_file": str(w.volume / "bundle.pem")}],
                     "watch_interval_s": 0.5},
        "upstream": {"url": "http://127.0.0.1:0", "idle_timeout_s": 5},  # port set at start
        "tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "algorithms": ["ES256"],
                                "jwks_file": str(d / "idp" / "jwks.json")}],
                   "dpop": {"public_origin": f"https://{HOST}:{w.port}"}},
        "policy": {"bundle": {
            "url": f"https://{HOST}:{w.cp_port}/bundles/demo",
            "public_keys": [str(d / "cp" / "signing.pub")], "server_id": CP_ID,
            "cache_dir": str(d / "cache"), "long_poll_s": long_poll_s, "min_delay_s": 0.5,
            "max_delay_s": 1.0, "timeout_s": 5}},
        "audit": {"signing_key_file": str(d / "audit.key"), "checkpoint_every_records": 1000,
                  "checkpoint_every_s": 10},
        "admin": {"address": HOST, "port": w.admin},
        "server": {"drain_delay_s": 0, "drain_timeout_s": 10},
    }, sort_keys=False))
    return w


# ------------------------------------------------------------------------------------------------
# Processes (each in its own session; stopped by pid, never by name)


class Proc:
    def __init__(self, name: str, args: list[str], cwd: Path, stdout: Path, stderr: Path) -> None:
        self.name = name
        self.stdout_path, self.stderr_path = stdout, stderr
        self._out, self._err = open(stdout, "wb"), open(stderr, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=cwd,
                                  stdout=self._out, stderr=self._err, start_new_session=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO),
                                       "PYTHONUNBUFFERED": "1"})

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._out.close()
        self._err.close()
        return self.p.returncode

    def fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.p.pid}/fd"))
        except OSError:
            return None


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def curl_json(w: World, gen: int, method: str, path: str, *, data: bytes | None = None,
                    json_body: dict | None = None) -> tuple[int, dict]:
    """The deployer talking to the control plane, as an operator would: curl with its SVID."""
    cdir = w.d / f"deployer-ca{gen}"
    args = ["curl", "-sS", "--max-time", "10", "--cacert", str(w.d / "both-cas.pem"),
            "--cert", str(cdir / "svid.pem"), "--key", str(cdir / "svid_key.pem"),
            "-X", method, "-o", "-", "-w", "\n%{http_code}"]
    body = None
    if data is not None:
        args += ["-H", "Content-Type: application/gzip", "--data-binary", "@-"]
        body = data
    elif json_body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        body = json.dumps(json_body).encode()
    args.append(f"https://{HOST}:{w.cp_port}{path}")
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(body), 20)
    text, _, code = out.decode().rpartition("\n")
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError:
        doc = {"raw": text[:200]}
    return int(code or 0), doc


# ------------------------------------------------------------------------------------------------
# The run


@dataclass
class Revision:
    number: int
    content: tuple[str, frozenset]  # (policy name, revoked workloads)
    t_sent: float  # loop time the change was sent (it may apply from here on)
    t_ack: float  # loop time the control plane confirmed it
    what: str


@dataclass
class Result:
    rid: str
    kind: Kind
    gen: int
    t0: float
    t1: float = 0.0
    status: int | None = None
    error: str | None = None  # the body's error code, or the transport exception


@dataclass
class Soak:
    w: World
    duration: float
    rate: float
    window: float
    max_in_flight: int
    long_poll_s: int
    rng: random.Random
    revisions: list[Revision] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    shed: int = 0
    gen: dict = field(default_factory=lambda: {who: 1 for who in IDS})
    content: tuple[str, frozenset] = ("P1", frozenset())
    t_start: float = 0.0
    sessions: dict = field(default_factory=dict)
    gen_deployer: int = 1  # the deployer moves to its CA2 SVID once the control plane trusts CA2
    sidecar_certs: list = field(default_factory=list)  # SHA-256 of each own SVID, in order

    # -- clients --------------------------------------------------------------------------
    def ssl_ctx(self, who: str, gen: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, not a host name
        ctx.load_verify_locations(str(self.w.d / "both-cas.pem"))
        cdir = self.w.client_dir(who, gen)
        ctx.load_cert_chain(cdir / "svid.pem", cdir / "svid_key.pem")
        return ctx

    def session(self, who: str, gen: int, fresh: bool) -> aiohttp.ClientSession:
        key = (who, gen, fresh)
        s = self.sessions.get(key)
        if s is None:
            conn = aiohttp.TCPConnector(ssl=self.ssl_ctx(who, gen), limit=16, force_close=fresh)
            s = self.sessions[key] = aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=10))
        return s

    def tokens(self) -> None:
        d = self.w.d
        self.issuer_key = load_private_key(d / "idp" / "issuer.key")
        self.kid = (d / "idp" / "kid").read_text()
        self.agent_key = load_private_key(d / "agent-dpop.key")
        self.thief_key = load_private_key(d / "thief-dpop.key")
        from proxy.dev.tokens import jwk_thumbprint

        self.jkt = jwk_thumbprint(self.agent_key)
        self.token_minted = 0.0
        self.token = ""

    def current_token(self) -> str:
        now = time.time()
        if now - self.token_minted > 120:  # tokens live 10 minutes; re-minted every 2
            self.token = mint_access_token(
                self.issuer_key, kid=self.kid, iss=ISS, aud=AUD, sub="alice",
                actors=[IDS["agent"]], cnf_jkt=self.jkt, client_id="expense-app",
                scope="invoices:approve", ttl_s=600)
            self.token_minted = now
        return self.token

    async def one(self, i: int, kind: Kind) -> None:
        loop = asyncio.get_running_loop()
        rid = f"soak-{i}"
        path = kind.path.replace("{n}", str(self.rng.randrange(1, 10_000)))
        gen = self.gen[kind.who]
        res = Result(rid, kind, gen, loop.time())
        headers = {"x-request-id": rid}
        url = f"https://{HOST}:{self.w.port}{path}"
        if kind.auth is not None:
            tok = self.current_token()
            headers["Authorization"] = f"DPoP {tok}"
            if kind.auth in ("dpop", "stolen"):
                key = self.agent_key if kind.auth == "dpop" else self.thief_key
                headers["DPoP"] = mint_dpop_proof(key, method=kind.method, url=url,
                                                  access_token=tok)
        data = b'{"item": 1, "qty": 2}' if kind.method == "POST" else None
        if data is not None:
            headers["content-type"] = "application/json"
        fresh = self.rng.random() < 0.2  # a fifth of the requests make a new TLS handshake
        try:
            async with self.session(kind.who, gen, fresh).request(
                    kind.method, url, headers=headers, data=data) as r:
                body = await r.read()
                res.status = r.status
                if r.status != 200:
                    try:
                        res.error = json.loads(body).get("error")
                    except ValueError:
                        res.error = body[:80].decode("latin-1")
        except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError, OSError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:200]
        res.t1 = loop.time()
        self.results.append(res)

    async def load(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        weights = [k.weight for k in KINDS]
        interval = 1.0 / self.rate
        next_at = loop.time()
        in_flight: set[asyncio.Task] = set()
        i = 0
        while not stop.is_set():
            now = loop.time()
            if now < next_at:
                await asyncio.sleep(next_at - now)
                continue
            next_at += interval
            if len(in_flight) >= self.max_in_flight:
                self.shed += 1  # open loop: a request we could not start in time is not queued
                continue
            kind = self.rng.choices(KINDS, weights)[0]
            t = loop.create_task(self.one(i, kind))
            in_flight.add(t)
            t.add_done_callback(in_flight.discard)
            i += 1
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)

    # -- changes ----------------------------------------------------------------------------
    def rel(self) -> float:
        return asyncio.get_running_loop().time() - self.t_start

    def event(self, what: str, ok: bool = True, **extra) -> None:
        self.events.append({"t": round(self.rel(), 3), "what": what, "ok": ok, **extra})
        log(f"  t={self.rel():6.1f}s  {'ok  ' if ok else 'FAIL'} {what}"
            + (f" {extra}" if extra else ""))
        if not ok:
            self.failures.append(f"event failed: {what} {extra}")

    async def change_policy(self, what: str, method: str, path: str, content, **kw) -> None:
        loop = asyncio.get_running_loop()
        t_sent = loop.time()
        status, doc = await curl_json(self.w, self.gen_deployer, method, path, **kw)
        t_ack = loop.time()
        rev = doc.get("revision")
        ok = status == 201 and isinstance(rev, int)
        self.event(what, ok, revision=rev, status=status)
        if ok:
            self.revisions.append(Revision(rev, content, t_sent, t_ack, what))
            self.content = content

    async def publish(self, policy: str) -> None:
        content = (policy, self.content[1])
        await self.change_policy(f"publish policy {policy}", "POST", "/v1/bundles/demo/publish",
                                 content, data=source_targz(*content))

    async def revoke(self, add: bool) -> None:
        revoked = self.content[1] | {REVOKED} if add else self.content[1] - {REVOKED}
        await self.change_policy(("revoke " if add else "un-revoke ") + IDS[REVOKED],
                                 "POST" if add else "DELETE", "/v1/bundles/demo/revocations",
                                 (self.content[0], frozenset(revoked)),
                                 json_body={"spiffe_ids": [IDS[REVOKED]]})

    async def sidecar_metric(self, prefix: str) -> float:
        _, text = await asyncio.to_thread(http_get, f"http://{HOST}:{self.w.admin}/metrics")
        return metric(text, prefix)

    async def wait_metric_above(self, prefix: str, before: float, what: str) -> bool:
        for _ in range(100):  # bounded: 10 s
            if await self.sidecar_metric(prefix) > before:
                return True
            await asyncio.sleep(0.1)
        self.event(f"{what}: not seen by the sidecar within 10 s", False)
        return False

    async def rotate_trust(self) -> None:
        w = self.w
        both = w.ca1.bundle_pem() + w.ca2.bundle_pem()
        atomic_write(w.d / "cp" / "trust.pem", both)  # the control plane first
        for _ in range(100):  # until the control plane accepts a CA2-issued caller
            status, _ = await curl_json(w, 2, "GET", "/v1/bundles/demo")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        else:
            self.event("control plane never trusted CA2", False)
        self.gen_deployer = 2
        prefix = 'portcullis_refresh_total{result="changed",source="trust_bundle"}'
        before = await self.sidecar_metric(prefix)
        k8s_swap(w.volume, {"svid.pem": (w.volume / "svid.pem").read_bytes(),
                            "svid_key.pem": (w.volume / "svid_key.pem").read_bytes(),
                            "bundle.pem": both}, "v2")
        if await self.wait_metric_above(prefix, before, "trust bundle CA1+CA2"):
            self.event("trust bundle CA1 -> CA1+CA2 (..data swap), seen by the sidecar")

    async def rotate_svid(self, version: str) -> None:
        w = self.w
        svid = w.ca2.issue_svid(SIDECAR_ID, ttl_s=int(self.duration) + 3600)
        prefix = 'portcullis_refresh_total{result="changed",source="svid"}'
        before = await self.sidecar_metric(prefix)
        k8s_swap(w.volume, {"svid.pem": svid.cert_pem(), "svid_key.pem": svid.key_pem(),
                            "bundle.pem": w.ca1.bundle_pem() + w.ca2.bundle_pem()}, version)
        self.sidecar_certs.append(cert_sha256(svid.cert))
        if await self.wait_metric_above(prefix, before, f"own SVID {version}"):
            self.event(f"own SVID re-issued by CA2 (..data swap {version}), seen by the sidecar")

    async def move_clients(self) -> None:
        for who in MOVE_TO_CA2:
            self.gen[who] = 2
        self.event(f"clients {', '.join(MOVE_TO_CA2)} now present CA2-issued SVIDs")

    async def choreography(self, stop: asyncio.Event) -> None:
        D = self.duration
        gap = 2.0
        svid1_expiry_rel = self.w.svid1_not_after - time.time() + self.rel()
        plan = [
            (0.08 * D, lambda: self.publish("P2")),
            (0.16 * D, self.rotate_trust),
            (0.24 * D, lambda: self.rotate_svid("v3")),
            (0.30 * D, self.move_clients),
            # after the first SVID expired and any long poll parked before that has returned
            (max(0.50 * D, svid1_expiry_rel + self.long_poll_s + 2), lambda: self.revoke(True)),
            (0.66 * D, lambda: self.publish("P1")),
            (0.80 * D, lambda: self.revoke(False)),
            (0.90 * D, lambda: self.rotate_svid("v4")),
        ]
        last = 0.0
        for at, action in plan:
            at = max(at, last + gap)
            await asyncio.sleep(max(0.0, at - self.rel()))
            await action()
            last = self.rel()
        await asyncio.sleep(max(D - self.rel(), 3.0))
        stop.set()


# ------------------------------------------------------------------------------------------------
# Checks


def acceptable(revs: list[Revision], t0: float, t1: float, window: float) -> list[Revision]:
    """Revisions that may legitimately decide a request that ran from t0 to t1: sent before it
    ended, and not superseded (successor confirmed + the convergence window) before it began."""
    out = []
    for i, r in enumerate(revs):
        nxt = revs[i + 1] if i + 1 < len(revs) else None
        if r.t_sent <= t1 and (nxt is None or nxt.t_ack + window > t0):
            out.append(r)
    return out


def analyse(s: Soak, audit_lines: list[dict], upstream: Upstream) -> dict:
    fail = s.failures
    revs = sorted(s.revisions, key=lambda r: r.number)
    by_number = {r.number: r for r in revs}
    decisions: dict[str, list[dict]] = {}
    unknown_audit = 0
    for rec in audit_lines:
        if rec.get("type") != "decision":
            continue
        rid = rec.get("request_id") or ""
        if rid.startswith("soak-"):
            decisions.setdefault(rid, []).append(rec)
        else:
            unknown_audit += 1
    counts = Counter()
    examples: dict[str, list[str]] = {}
    counted: set[tuple[str, str]] = set()

    def bad(category: str, r: Result, detail: str) -> None:
        if (category, r.rid) in counted:  # one request counts once per category
            return
        counted.add((category, r.rid))
        counts[category] += 1
        ex = examples.setdefault(category, [])
        if len(ex) < 3:
            ex.append(f"{r.rid} {r.kind.name} (ca{r.gen}) t={r.t0 - s.t_start:.2f}s: {detail}")

    answered = 0
    for r in s.results:
        ok_revs = acceptable(revs, r.t0, r.t1, s.window)
        expected = {expected_status(r.kind, rev.content) for rev in ok_revs}
        if len(expected) > 1:
            counts["in_convergence_window"] += 1
        up = upstream.seen.get(r.rid)
        if r.status is None:
            bad("failed_authorised" if expected == {200} else "transport_error", r,
                f"no answer ({r.error})")
        else:
            answered += 1
            if r.status not in expected:
                if expected == {200}:
                    bad("failed_authorised", r, f"got {r.status} {r.error}, expected 200")
                elif r.status == 200:
                    bad("authorised_by_mistake", r, f"got 200, expected {sorted(expected)}")
                else:
                    bad("unexpected_status", r, f"got {r.status} {r.error}, expected "
                                                f"{sorted(expected)}")
        if up is not None:
            if 200 not in expected:
                bad("authorised_by_mistake", r, f"reached the upstream, expected "
                                                f"{sorted(expected)}")
            if up.spiffe_id != IDS[r.kind.who]:
                bad("wrong_identity_upstream", r, f"upstream saw {up.spiffe_id}")
            if r.kind.auth == "dpop" and up.subject != "alice":
                bad("wrong_identity_upstream", r, f"upstream saw subject {up.subject}")
        elif r.status == 200:
            bad("200_without_upstream_record", r, "")
        recs = decisions.get(r.rid, [])
        if r.status is None:
            if len(recs) > 1:
                bad("audit_duplicate", r, f"{len(recs)} records")
            continue
        if len(recs) != 1:
            bad("audit_missing" if not recs else "audit_duplicate", r, f"{len(recs)} records")
            continue
        rec = recs[0]
        if rec.get("status") != r.status:
            bad("audit_status_mismatch", r, f"audit {rec.get('status')} vs {r.status}")
        rev_s = str(rec.get("policy_revision") or "")
        num = int(rev_s.split("@", 1)[1]) if rev_s.startswith("demo@") else None
        if num is None or num not in by_number:
            bad("audit_unknown_revision", r, rev_s)
            continue
        if by_number[num] not in ok_revs:
            bad("decided_by_stale_revision", r, f"{rev_s}, acceptable "
                                                f"{[x.number for x in ok_revs]}")
        want = expected_status(r.kind, by_number[num].content)
        if r.status != want:
            bad("inconsistent_with_deciding_revision", r, f"{rev_s} says {want}, got {r.status}")
    extra_upstream = set(upstream.seen) - {r.rid for r in s.results}
    if extra_upstream or upstream.unknown or upstream.duplicates:
        counts["unexplained_upstream_requests"] += (len(extra_upstream) + upstream.unknown
                                                     + upstream.duplicates)
    n_decisions = sum(len(v) for v in decisions.values())
    if n_decisions != answered or unknown_audit:
        fail.append(f"audit decision records {n_decisions} (+{unknown_audit} unknown) != "
                    f"requests answered {answered}")
    for category in ("failed_authorised", "authorised_by_mistake", "unexpected_status",
                     "transport_error", "wrong_identity_upstream", "200_without_upstream_record",
                     "audit_missing", "audit_duplicate", "audit_status_mismatch",
                     "audit_unknown_revision", "decided_by_stale_revision",
                     "inconsistent_with_deciding_revision", "unexplained_upstream_requests"):
        if counts[category]:
            fail.append(f"{category}: {counts[category]}  e.g. {examples.get(category, [])}")
    # convergence: from the change being sent to the first request decided by that revision
    convergence = {}
    first_seen: dict[int, float] = {}
    for r in s.results:
        recs = decisions.get(r.rid)
        if recs and str(recs[0].get("policy_revision", "")).startswith("demo@"):
            n = int(recs[0]["policy_revision"].split("@")[1])
            first_seen[n] = min(first_seen.get(n, r.t1), r.t1)
    for rev in revs[1:]:
        if rev.number in first_seen:
            convergence[rev.number] = round(max(0.0, first_seen[rev.number] - rev.t_sent), 3)
    return {"answered": answered, "counts": dict(counts), "audit_decisions": n_decisions,
            "upstream_requests": len(upstream.seen), "convergence_s_upper_bound": convergence}


def cp_fetch_certs(path: Path) -> list[str]:
    """Distinct client certificates the control plane saw fetching bundles, in order."""
    seen: list[str] = []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("path", "").startswith("/bundles/") and rec.get("peer") == SIDECAR_ID:
            h = rec.get("peer_cert_sha256")
            if h and h not in seen:
                seen.append(h)
    return seen


# ------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, d: Path) -> int:
    loop = asyncio.get_running_loop()
    log(f"soak: {args.duration:.0f} s at {args.rate:.0f} req/s, convergence window "
        f"{args.convergence_s} s, files in {d}")
    w = make_world(d, args.duration, args.long_poll_s)
    upstream = Upstream()
    await upstream.start()
    cfg = yaml.safe_load((d / "sidecar.yaml").read_text())
    cfg["upstream"]["url"] = f"http://{HOST}:{upstream.port}"
    (d / "sidecar.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    procs: list[Proc] = []
    s = Soak(w, args.duration, args.rate, args.convergence_s, args.max_in_flight,
             args.long_poll_s, random.Random(args.seed))
    s.sidecar_certs.append(w.svid1_sha256)
    s.tokens()
    report: dict = {"duration_s": args.duration, "rate": args.rate, "dir": str(d)}
    try:
        cp = Proc("control plane", ["control-plane", "serve", "--config", str(d / "cp.yaml")], d,
                  d / "cp-audit.jsonl", d / "cp.log")
        procs.append(cp)
        for _ in range(300):  # bounded: 30 s
            if not cp.alive():
                raise RuntimeError("the control plane exited: see cp.log")
            status, _ = await curl_json(w, 1, "GET", "/v1/bundles/demo")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the control plane did not come up")
        s.revisions.append(Revision(1, ("P1", frozenset()), 0.0, 0.0, "initial"))
        sidecar = Proc("sidecar", ["serve", "--config", str(d / "sidecar.yaml")], d,
                       d / "audit.jsonl", d / "sidecar.log")
        procs.append(sidecar)
        for _ in range(300):
            if not sidecar.alive():
                raise RuntimeError("the sidecar exited: see sidecar.log")
            if (await asyncio.to_thread(http_get, f"http://{HOST}:{w.admin}/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the sidecar did not become ready")
        fds_before = sidecar.fds()
        s.t_start = loop.time()
        log(f"soak: sidecar ready (fds {fds_before}); load starts; first SVID expires in "
            f"{w.svid1_not_after - time.time():.1f} s")
        stop = asyncio.Event()
        deadline = args.duration + 60  # watchdog for the choreography (bounded run)
        load = loop.create_task(s.load(stop))
        try:
            await asyncio.wait_for(s.choreography(stop), deadline)
        except asyncio.TimeoutError:
            s.failures.append("the change choreography did not finish in time")
            stop.set()
        await load
        elapsed = loop.time() - s.t_start
        for sess in s.sessions.values():
            await sess.close()
        await asyncio.sleep(0.5)
        report["fds"] = {"before": fds_before, "after_load": sidecar.fds()}
        # SIGTERM, clean drain, sealed audit log
        rc = await asyncio.to_thread(sidecar.stop, 30)
        report["sidecar_exit"] = rc
        if rc != 0:
            s.failures.append(f"sidecar exit status {rc} after SIGTERM")
        audit_lines = [json.loads(x) for x in (d / "audit.jsonl").read_bytes().splitlines()]
        if not audit_lines or audit_lines[-1].get("type") != "checkpoint" \
                or not audit_lines[-1].get("final"):
            s.failures.append("the audit log does not end with a final checkpoint")
        v = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "audit", "verify",
                             str(d / "audit.jsonl"), "--public-key", str(d / "audit.pub")],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        report["audit_verify"] = v.stdout.strip().splitlines()[-1:] if v.stdout else v.stderr
        if v.returncode != 0:
            s.failures.append(f"portcullis audit verify failed: {v.stdout.strip()[-500:]}")
        tracebacks = (d / "sidecar.log").read_text(errors="replace").count("Traceback")
        if tracebacks:
            s.failures.append(f"{tracebacks} traceback(s) in sidecar.log")
        report.update(analyse(s, audit_lines, upstream))
        seen = cp_fetch_certs(d / "cp-audit.jsonl")
        report["cp_fetch_certificates"] = [s.sidecar_certs.index(h) + 1 if h in s.sidecar_certs
                                           else "unknown" for h in seen]
        report["elapsed_s"] = round(elapsed, 1)
        report["requests"] = len(s.results)
        report["shed"] = s.shed
        report["events"] = s.events
        report["revisions"] = [{"revision": r.number, "what": r.what,
                                "policy": r.content[0], "revoked": sorted(r.content[1]),
                                "t_sent": round(r.t_sent - s.t_start, 3) if r.number > 1 else None}
                               for r in s.revisions]
        report["by_kind"] = {k.name: dict(Counter(r.status for r in s.results if r.kind is k))
                             for k in KINDS}
    finally:
        for sess in s.sessions.values():
            if not sess.closed:
                await sess.close()
        for p in reversed(procs):
            await asyncio.to_thread(p.stop, 20)
        upstream.close()
    report["failures"] = s.failures
    (d / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    return 1 if s.failures else 0


def print_report(r: dict) -> None:
    out = sys.stdout
    print("\n== Portcullis soak report ==", file=out)
    print(f"requests {r.get('requests')} in {r.get('elapsed_s')} s (shed by the open loop: "
          f"{r.get('shed')}), answered {r.get('answered')}, audit decisions "
          f"{r.get('audit_decisions')}, reached the upstream {r.get('upstream_requests')}",
          file=out)
    c = r.get("counts", {})
    print(f"in a convergence window (either outcome accepted): {c.get('in_convergence_window', 0)}",
          file=out)
    print(f"failed authorised: {c.get('failed_authorised', 0)}   authorised by mistake: "
          f"{c.get('authorised_by_mistake', 0)}   other unexpected: "
          f"{c.get('unexpected_status', 0)}   transport errors: {c.get('transport_error', 0)}",
          file=out)
    print(f"convergence upper bound per revision (s): {r.get('convergence_s_upper_bound')}",
          file=out)
    print(f"own SVIDs (1 = first) the control plane saw fetching bundles, in order: "
          f"{r.get('cp_fetch_certificates')}", file=out)
    print(f"sidecar fds: {r.get('fds')}   exit: {r.get('sidecar_exit')}   audit verify: "
          f"{r.get('audit_verify')}", file=out)
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in r.get("by_kind", {}).items()), file=out)
    if r["failures"]:
        print(f"\nFAILED ({len(r['failures'])}):", file=out)
        for f in r["failures"]:
            print(f"  - {f}", file=out)
    else:
        print("\nPASS: every check held", file=out)
    print(f"report: {r.get('dir')}/report.json", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (30..3600)")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (1..1000)")
    p.add_argument("--convergence-s", type=float, default=5.0,
                   help="how long after a confirmed change the previous revision may still decide")
    p.add_argument("--max-in-flight", type=int, default=64, help="open-loop concurrency cap")
    p.add_argument("--long-poll-s", type=int, default=5, help="the sidecar's long-poll wait")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the run directory even on success")
    args = p.parse_args(argv)
    if not 30 <= args.duration <= 3600 or not 1 <= args.rate <= 1000:
        p.error("--duration must be 30..3600 and --rate 1..1000 (the soak is bounded)")
    if not 0 < args.convergence_s <= 60 or not 1 <= args.max_in_flight <= 512:
        p.error("--convergence-s must be in (0, 60], --max-in-flight 1..512")
    if shutil.which("curl") is None:
        log("soak: curl is required (apt-get install curl)")
        return 2
    d = Path(tempfile.mkdtemp(prefix="portcullis-soak-"))
    rc = 2

    def on_signal(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        rc = uvloop.run(run(args, d))
    except KeyboardInterrupt:
        log("soak: interrupted")
        rc = 2
    except (RuntimeError, OSError) as exc:
        log(f"soak: could not run: {exc}")
        for name in ("cp.log", "sidecar.log"):
            if (d / name).exists():
                log(f"--- {name} (tail)\n{(d / name).read_text(errors='replace')[-3000:]}")
        rc = 2
    if rc == 0 and not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    else:
        log(f"soak: files kept in {d}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
