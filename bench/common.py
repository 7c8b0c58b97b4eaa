"""Shared machinery of the benchmark scripts (bench/run.py, bench/latency.py).

- A throw-away PKI made with `proxy.dev.ca.DevCA` (SVIDs in spiffe-helper layout), shared by every
  target: the caller's SVID is the client certificate everywhere, the sidecar's SVID is the server
  certificate of Portcullis, nginx and HAProxy, and all three trust the same CA bundles.
- Targets: the upstream itself (plain HTTP), nginx, HAProxy and Portcullis (mTLS), started once,
  pinned with `taskset` (proxies on one core, load generator and upstream on the other).
- Process hygiene: every child runs in its own session (process group) with PR_SET_PDEATHSIG, and
  `Harness.close()` (called on normal exit, exceptions, Ctrl-C, SIGTERM, SIGHUP) stops each group
  it started by its id: SIGTERM, then SIGKILL after a grace period. Everything listens on and
  talks to 127.0.0.1 only.
- /proc readers: CPU seconds (utime+stime from /proc/<pid>/stat, summed over the process tree)
  and RSS (VmRSS from /proc/<pid>/status, summed over the tree).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TD = "example.org"
PARTNER_TD = "partner.org"
SIDECAR_ID = f"spiffe://{TD}/ns/bench/sa/sidecar"
CLIENT_ID = f"spiffe://{TD}/ns/bench/sa/loadgen"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# /proc readers


def proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def proc_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (alive now)."""
    kids = proc_children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds; 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pids: list[int]) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two snapshots of a tree; processes that appeared count from zero."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def rss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"


# ------------------------------------------------------------------------------------------------
# processes

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid


class Harness:
    """Owns a temp dir and every process started; `close()` stops them all (idempotent)."""

    def __init__(self, keep: bool = False, prefix: str = "portcullis-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.procs: list[Proc] = []
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    def __enter__(self) -> "Harness":
        # a shell's background job inherits SIGINT ignored: make Ctrl-C / kill -INT work anyway
        self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def start(self, name: str, argv: list[str], *, cpus: str | None = None,
              stdout: Any = subprocess.DEVNULL, stderr: Any = None, env: dict | None = None,
              cwd: str | Path | None = None, stop_signal: int = signal.SIGTERM) -> Proc:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        if stderr is None:
            stderr = open(self.dir / f"{name}.stderr", "ab")
        p = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                             start_new_session=True, preexec_fn=_child_setup)
        proc = Proc(name, p, stop_signal)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 8.0) -> None:
        p = proc.popen
        if p.poll() is None:
            try:
                os.killpg(p.pid, proc.stop_signal)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"bench: {proc.name} (pid {p.pid}) did not stop in {grace_s}s: SIGKILL")
        # the group may hold children that outlive the leader (nginx workers, spawned workers)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # stop in reverse start order, and never be interrupted half-way by another Ctrl-C
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(list(self.procs)):
                self.stop(proc)
        finally:
            signal.signal(signal.SIGINT, old_int)
            for sig, h in self._old_handlers.items():
                signal.signal(sig, h)
        if self.keep:
            log(f"bench: kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_layout() -> tuple[str | None, str | None, str | None]:
    """(proxy cpus, load generator + upstream cpus, all cpus) as taskset lists; None = no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, None
    return str(cpus[0]), str(cpus[1]), ",".join(map(str, cpus[:2]))


# ------------------------------------------------------------------------------------------------
# PKI, tools


@dataclass
class Pki:
    root: Path
    sidecar_dir: Path
    client_cert: str
    client_key: str
    ca_bundle: str  # example.org + partner.org roots: what every proxy trusts
    server_cert: str
    server_key: str
    server_cert_and_key: str  # for HAProxy's `crt`

    @property
    def client_ca(self) -> str:  # what the load generator verifies the server with
        return str(self.root / "bundles" / f"{TD}.pem")


def make_pki(root: Path) -> Pki:
    sys.path.insert(0, str(REPO))
    from proxy.dev.ca import DevCA, generate_ed25519_keypair

    root.mkdir(parents=True, exist_ok=True)
    ca = DevCA.create(TD)
    partner = DevCA.create(PARTNER_TD)
    bundles = root / "bundles"
    bundles.mkdir(exist_ok=True)
    (bundles / f"{TD}.pem").write_bytes(ca.bundle_pem())
    (bundles / f"{PARTNER_TD}.pem").write_bytes(partner.bundle_pem())
    (bundles / "all.pem").write_bytes(ca.bundle_pem() + partner.bundle_pem())
    sidecar = root / "sidecar"
    ca.issue_svid(SIDECAR_ID, ttl_s=86400).write(sidecar, bundle_pem=ca.bundle_pem())
    client = root / "clients" / "loadgen"
    ca.issue_svid(CLIENT_ID, ttl_s=86400).write(client, bundle_pem=ca.bundle_pem())
    both = root / "sidecar" / "svid_and_key.pem"
    both.write_bytes((sidecar / "svid.pem").read_bytes() + (sidecar / "svid_key.pem").read_bytes())
    os.chmod(both, 0o600)
    priv, pub = generate_ed25519_keypair()
    (root / "audit.key").write_bytes(priv)
    os.chmod(root / "audit.key", 0o600)
    (root / "audit.pub").write_bytes(pub)
    return Pki(root, sidecar, str(client / "svid.pem"), str(client / "svid_key.pem"),
               str(bundles / "all.pem"), str(sidecar / "svid.pem"), str(sidecar / "svid_key.pem"),
               str(both))


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"bench: needs Debian packages {' '.join(packages)}: "
                         f"sudo apt-get install {' '.join(packages)}")
    log(f"bench: installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def require_tools() -> None:
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (Debian: apt-get install "
                         f"{' '.join('util-linux' if t == 'taskset' else t for t in missing)})")


def build_shim(out_dir: Path) -> Path:
    """Compile the wrk mTLS LD_PRELOAD shim (installs libssl-dev / gcc when missing)."""
    need = []
    if shutil.which("gcc") is None:
        need.append("gcc")
    if not Path("/usr/include/openssl/ssl.h").exists():
        need.append("libssl-dev")
    if need:
        _apt_install(*need)
    so = out_dir / "wrk_mtls_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(so),
                    str(BENCH / "wrk_mtls_shim.c"), "-ldl", "-lssl", "-lcrypto"], check=True)
    return so


def render(template: Path, out: Path, **values: Any) -> Path:
    text = template.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"{template.name}: no value for {{{{{m.group(1)}}}}}")
        return str(values[m.group(1)])

    out.write_text(re.sub(r"\{\{(\w+)\}\}", sub, text))
    return out


def tool_versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"

    def git(*argv: str) -> str:  # read-only queries; --no-optional-locks: never touch the index
        try:
            r = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *argv],
                               capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return r.stdout.strip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_head": git("rev-parse", "HEAD"),
            "git_modified_files": len(dirty.splitlines()) if dirty != "?" else "?",
            "wrk": first(["wrk", "-v"]), "nginx": first(["nginx", "-v"]),
            "haproxy": first(["haproxy", "-v"]), "python": sys.version.split()[0],
            "kernel": os.uname().release, "openssl": ssl.OPENSSL_VERSION}


# ------------------------------------------------------------------------------------------------
# targets


def client_ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.client_ca)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def probe(port: int, tls: ssl.SSLContext | None, path: str = "/") -> int:
    """One GET on a fresh connection; returns the status code (raises OSError on failure)."""
    with socket.create_connection((HOST, port), timeout=2) as raw:
        # without TCP_NODELAY the request after a TLS 1.3 handshake can sit out a 40 ms delayed
        # ACK when the server sends nothing after its Finished (Portcullis: no session tickets)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = tls.wrap_socket(raw, server_hostname=None) if tls else raw
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                         .encode())
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            if tls:
                sock.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    if not m:
        raise OSError(f"not an HTTP response: {data[:80]!r}")
    return int(m.group(1))


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, proc: Proc | None = None,
               errfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            tail = errfile.read_text(errors="replace")[-3000:] if errfile and errfile.exists() else ""
            raise RuntimeError(f"{what}: exited with status {proc.popen.returncode}\n{tail}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    tail = errfile.read_text(errors="replace")[-3000:] if errfile and errfile.exists() else ""
    raise RuntimeError(f"{what}: not ready after {timeout_s}s ({last})\n{tail}")


@dataclass
class Target:
    name: str
    kind: str  # upstream | nginx | haproxy | pyfloor* | portcullis | portcullis-dpop
    port: int
    tls: bool
    proc: Proc | None = None
    cpus: str | None = None
    log_file: Path | None = None  # audit / access log (opened O_APPEND, truncated between runs)
    stderr_file: Path | None = None
    admin_port: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}/"

    @property
    def dpop(self) -> bool:
        """Whether each request carries the access token and a fresh DPoP proof (the full
        pipeline: portcullis-dpop, and its floor pyfloor-dpop)."""
        return "credentials" in self.extra

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc else []

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def log_lines_and_reset(self) -> tuple[int, int] | None:
        """(lines, bytes) written to the log since the last reset; the file is then emptied."""
        if self.log_file is None:
            return None
        n = size = 0
        try:
            with open(self.log_file, "rb") as f:
                while chunk := f.read(1 << 20):
                    n += chunk.count(b"\n")
                    size += len(chunk)
            os.truncate(self.log_file, 0)  # writers hold it O_APPEND: they continue at offset 0
        except OSError:
            return None
        return n, size


def start_upstream(h: Harness, cpus: str | None, body_bytes: int = 13) -> Target:
    port = free_port()
    err = h.dir / "upstream.stderr"
    proc = h.start("upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(port),
                                "--body-bytes", str(body_bytes)], cpus=cpus,
                   stderr=open(err, "ab"))
    t = Target("upstream", "upstream", port, False, proc, cpus, stderr_file=err,
               note="plain HTTP, no proxy")
    wait_until(lambda: probe(port, None) == 200, 10, "upstream", proc, err)
    return t


def start_nginx(h: Harness, pki: Pki, upstream_port: int, cpus: str | None, workers: int = 1,
                access_log: bool = True, name: str = "nginx") -> Target | None:
    if shutil.which("nginx") is None:
        log("bench: nginx not installed (apt-get install nginx-light): baseline skipped")
        return None
    d = h.dir / name
    (d / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    logf = d / "access.log"
    conf = render(BENCH / "nginx.conf.tmpl", d / "nginx.conf", workers=workers, dir=d, port=port,
                  upstream_port=upstream_port, cert=pki.server_cert, key=pki.server_key,
                  ca=pki.ca_bundle,
                  access_log=(f"access_log {logf} combined buffer=64k flush=1s;" if access_log
                              else "access_log off;"))
    err = d / "stderr"
    proc = h.start(name, ["nginx", "-e", str(d / "nginx-error.log"), "-p", str(d), "-c", str(conf),
                          "-g", "daemon off;"], cpus=cpus, stderr=open(err, "ab"),
                   stop_signal=signal.SIGTERM)  # nginx: fast shutdown
    t = Target(name, "nginx", port, True, proc, cpus, logf if access_log else None, err,
               note=f"{workers} worker(s)" + (", access log" if access_log else ""))
    tls = client_ssl_context(pki)
    wait_until(lambda: probe(port, tls) == 200, 15, name, proc, d / "nginx-error.log")
    return t


def start_haproxy(h: Harness, pki: Pki, upstream_port: int, cpus: str | None, threads: int = 1,
                  access_log: bool = True, name: str = "haproxy") -> Target | None:
    if shutil.which("haproxy") is None:
        log("bench: haproxy not installed (apt-get install haproxy): baseline skipped")
        return None
    d = h.dir / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = render(BENCH / "haproxy.cfg.tmpl", d / "haproxy.cfg", threads=threads, port=port,
                  upstream_port=upstream_port, cert_and_key=pki.server_cert_and_key,
                  ca=pki.ca_bundle,
                  log_global="log stdout format raw local0" if access_log else "",
                  log_defaults="log global\n    option httplog" if access_log else "")
    logf = d / "access.log"
    err = d / "stderr"
    proc = h.start(name, ["haproxy", "-db", "-f", str(conf)], cpus=cpus,
                   stdout=open(logf, "ab"), stderr=open(err, "ab"))  # SIGTERM: hard stop
    t = Target(name, "haproxy", port, True, proc, cpus, logf if access_log else None, err,
               note=f"{threads} thread(s)" + (", access log" if access_log else ""))
    tls = client_ssl_context(pki)
    wait_until(lambda: probe(port, tls) == 200, 15, name, proc, err)
    return t


def portcullis_config(pki: Pki, upstream_port: int, port: int, admin_port: int,
                      path: Path, dpop_jwks: Path | None = None) -> Path:
    import yaml

    policy = {
        "version": 1,
        "revision": "bench-1",
        "rules": [
            {"id": "loadgen-reads", "effect": "allow",
             "from": {"workloads": [CLIENT_ID]},
             "to": [{"methods": ["GET", "HEAD"], "paths": ["/**"]}]},
            {"id": "partner-billing", "effect": "allow",
             "from": {"workloads": [f"spiffe://{PARTNER_TD}/**"]},
             "to": [{"methods": ["GET"], "paths": ["/billing/**"]}]},
            {"id": "no-admin", "effect": "deny",
             "from": {"workloads": [f"spiffe://{TD}/**"]},
             "to": [{"paths": ["/admin/**"]}]},
        ],
    }
    if dpop_jwks is not None:
        # the full pipeline: a DPoP-bound token (cached after the first request) and a fresh,
        # verified proof on every request, then the policy decides on subject AND workload
        from dpop_load import ISSUER, SUBJECT
        policy["authentication"] = [{"paths": ["/**"], "token": "required", "binding": "dpop"}]
        policy["rules"][0] = {"id": "alice-via-loadgen", "effect": "allow",
                              "from": {"workloads": [CLIENT_ID],
                                       "subjects": [{"issuer": ISSUER, "sub": SUBJECT}]},
                              "to": [{"methods": ["GET", "HEAD"], "paths": ["/**"]}]}
    (path.parent / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    cfg = {
        "listener": {"address": HOST, "port": port},
        "identity": {
            "svid_file": str(pki.sidecar_dir / "svid.pem"),
            "svid_key_file": str(pki.sidecar_dir / "svid_key.pem"),
            "trust_domains": [
                {"name": TD, "bundle_file": str(pki.root / "bundles" / f"{TD}.pem")},
                {"name": PARTNER_TD, "bundle_file": str(pki.root / "bundles" / f"{PARTNER_TD}.pem")},
            ],
        },
        "upstream": {"url": f"http://{HOST}:{upstream_port}"},
        "policy": {"file": "policy.yaml"},
        "audit": {"signing_key_file": str(pki.root / "audit.key")},
        "admin": {"address": HOST, "port": admin_port},
        "server": {"log_level": "warning"},
    }
    if dpop_jwks is not None:
        from dpop_load import AUDIENCE, ISSUER
        cfg["tokens"] = {"issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE],
                                      "algorithms": ["ES256"], "jwks_file": str(dpop_jwks)}],
                         "dpop": {"public_origin": f"https://{HOST}:{port}",
                                  "algorithms": ["ES256"]}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_portcullis(h: Harness, pki: Pki, upstream_port: int, cpus: str | None, workers: int = 1,
                     name: str = "portcullis", dpop: bool = False, repo: Path = REPO) -> Target:
    """A Portcullis sidecar (`repo`: the source tree it runs from, e.g. a worktree of an older
    commit for bench/ab.py; its `proxy` package shadows the installed one via the cwd)."""
    d = h.dir / name
    d.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    creds = None
    if dpop:
        from dpop_load import Credentials
        creds = Credentials(d)
    cfg = portcullis_config(pki, upstream_port, port, admin, d / "sidecar.yaml",
                            dpop_jwks=creds.jwks_path if creds else None)
    audit = d / "audit.jsonl"
    err = d / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTCULLIS_")}
    proc = h.start(name, [sys.executable, "-m", "proxy", "serve", "--config", str(cfg),
                          "--workers", str(workers)], cpus=cpus, stdout=open(audit, "ab"),
                   stderr=open(err, "ab"), env=env, cwd=repo)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{HOST}:{admin}/readyz", timeout=2) as r:
            return r.status == 200

    wait_until(ready, 30, f"{name} /readyz", proc, err)
    tls = client_ssl_context(pki)
    if creds is not None:
        return Target(name, "portcullis-dpop", port, True, proc, cpus, audit, err, admin_port=admin,
                      note=f"--workers {workers}, DPoP-bound token + fresh ES256 proof per request",
                      extra={"credentials": creds, "htu": f"https://{HOST}:{port}/"})
    wait_until(lambda: probe(port, tls) == 200, 15, name, proc, err)
    return Target(name, "portcullis", port, True, proc, cpus, audit, err, admin_port=admin,
                  note=f"--workers {workers}")


def start_pyfloor(h: Harness, pki: Pki, upstream_port: int, cpus: str | None, *,
                  checks: bool = False, dpop: bool = False) -> Target:
    """bench/pyfloor.py: the bare uvloop+httptools mTLS forwarder without any check (the floor);
    `checks`: the same framing plus Portcullis's own per-request work (`pyfloor-checks`, see
    pyfloor.py), with the configuration, policy and audit file the portcullis target gets;
    `dpop` (implies checks): the configuration and credentials of `portcullis-dpop`, a fresh
    proof per request (`pyfloor-dpop`, the floor of the full pipeline)."""
    checks = checks or dpop
    name = "pyfloor-dpop" if dpop else "pyfloor-checks" if checks else "pyfloor"
    port = free_port()
    err = h.dir / f"{name}.stderr"
    cmd = [sys.executable, str(BENCH / "pyfloor.py"), "--port", str(port),
           "--upstream-port", str(upstream_port), "--cert", pki.server_cert,
           "--key", pki.server_key, "--ca", pki.ca_bundle]
    audit = None
    creds = None
    if checks:
        d = h.dir / name
        d.mkdir(parents=True, exist_ok=True)
        if dpop:
            from dpop_load import Credentials
            creds = Credentials(d)
        # the listener port in the configuration is pyfloor's own: DPoP's public origin names it
        cfg = portcullis_config(pki, upstream_port, port, free_port(), d / "sidecar.yaml",
                                dpop_jwks=creds.jwks_path if creds else None)
        cmd += ["--checks", str(cfg)]
        audit = d / "audit.jsonl"
    proc = h.start(name, cmd, cpus=cpus, stderr=open(err, "ab"),
                   stdout=open(audit, "ab") if audit else subprocess.DEVNULL, cwd=REPO)
    tls = client_ssl_context(pki)
    if creds is not None:
        # ready once it answers; without credentials a request is refused (401)
        wait_until(lambda: probe(port, tls) == 401, 15, name, proc, err)
        return Target(name, name, port, True, proc, cpus, audit, stderr_file=err,
                      note="bare Python forwarder + the full pipeline's checks (fresh ES256 proof"
                           " per request)",
                      extra={"credentials": creds, "htu": f"https://{HOST}:{port}/"})
    wait_until(lambda: probe(port, tls) == 200, 15, name, proc, err)
    return Target(name, name, port, True, proc, cpus, audit, stderr_file=err,
                  note="bare Python forwarder + Portcullis's per-request checks" if checks
                  else "bare Python forwarder, no checks")


def scrape_metrics(t: Target) -> str:
    if t.admin_port is None:
        return ""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{t.admin_port}/metrics", timeout=3) as r:
            return r.read().decode(errors="replace")
    except OSError as exc:
        return f"# scrape failed: {exc}"


# ------------------------------------------------------------------------------------------------
# stats


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def median(values: list[float]) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# load generators


def _wait_rusage(p: subprocess.Popen, timeout_s: float) -> float:
    """Reap `p` with wait4 and return its CPU seconds (user + system, itself and waited-for kids)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            raise RuntimeError(f"load generator pid {p.pid} overran its time; killed")
        time.sleep(0.01)


def run_wrk(h: Harness, t: Target, *, shim: Path, pki: Pki, duration_s: float, connections: int,
            threads: int, cpus: str | None, timeout_s: float = 2.0) -> dict:
    """One closed-loop wrk run (keep-alive, `connections` connections); wrk's JSON + its CPU."""
    env = dict(os.environ)
    if t.tls:
        env.update(LD_PRELOAD=str(shim), WRK_CLIENT_CERT=pki.client_cert,
                   WRK_CLIENT_KEY=pki.client_key)
    secs = max(1, round(duration_s))  # wrk takes whole seconds only
    script = BENCH / "wrk_report.lua"
    if t.dpop:
        # a fresh proof per request, minted before the run (never during it)
        creds = t.extra["credentials"]
        # sized from the fastest run seen so far (the warm-up, slowed by start-up, under-counts):
        # a run that exhausts the file gets replays refused as non-2xx, which the report shows
        n = int(max(4000 * secs, t.extra.get("max_rps", 0) * secs * 2))
        proofs = creds.proofs(t.extra["htu"], n, h.dir / "proofs.txt")
        env.update(WRK_DPOP_PROOFS=str(proofs), WRK_DPOP_TOKEN=creds.token,
                   WRK_REPORT_LUA=str(BENCH / "wrk_report.lua"))
        script = BENCH / "wrk_dpop.lua"
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{secs}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(script), t.url]
    errf = h.dir / "wrk.stderr"
    with open(errf, "wb") as err:
        proc = h.start("wrk", argv, cpus=cpus, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        cpu = _wait_rusage(proc.popen, secs + 30)
        out = proc.popen.stdout.read().decode(errors="replace")
    finally:
        h.procs.remove(proc)
        proc.popen.stdout.close()
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["wrk_cpu_s"] = cpu
            if t.dpop and r["duration_us"]:
                rps = r["requests"] / (r["duration_us"] / 1e6)
                t.extra["max_rps"] = max(rps, t.extra.get("max_rps", 0.0))
            return r
    raise RuntimeError(f"wrk against {t.name} failed (exit {proc.popen.returncode}):\n{out}\n"
                       f"{errf.read_text(errors='replace')[-2000:]}")


def run_openloop(h: Harness, t: Target, *, pki: Pki, rate: float, duration_s: float,
                 warmup_s: float, connections: int, cpus: str | None) -> dict:
    argv = [sys.executable, str(BENCH / "openloop.py"), "--port", str(t.port), "--rate", str(rate),
            "--duration", str(duration_s), "--warmup", str(warmup_s),
            "--connections", str(connections)]
    if t.tls:
        argv += ["--tls", "--cert", pki.client_cert, "--key", pki.client_key, "--ca", pki.client_ca]
    if t.dpop:  # one fresh proof per request, minted before the run
        creds = t.extra["credentials"]
        n = int(rate * (duration_s + warmup_s) * 1.2) + 1000
        proofs = creds.proofs(t.extra["htu"], n, h.dir / "openloop-proofs.txt")
        argv += ["--dpop-token", creds.token, "--dpop-proofs", str(proofs)]
    errf = h.dir / "openloop.stderr"
    with open(errf, "wb") as err:
        proc = h.start("openloop", argv, cpus=cpus, stdout=subprocess.PIPE, stderr=err)
    try:
        cpu = _wait_rusage(proc.popen, duration_s + warmup_s + 30)
        out = proc.popen.stdout.read().decode(errors="replace")
    finally:
        h.procs.remove(proc)
        proc.popen.stdout.close()
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"open-loop client against {t.name} failed (exit {proc.popen.returncode}):"
                           f"\n{out}\n{errf.read_text(errors='replace')[-2000:]}") from None
    r["client_cpu_s"] = cpu
    return r


# ------------------------------------------------------------------------------------------------
# target sets

BASE_TARGETS = ("upstream", "nginx", "haproxy", "pyfloor", "pyfloor-checks", "portcullis",
                "pyfloor-dpop", "portcullis-dpop")
TWO_CORE_TARGETS = ("nginx-w2", "haproxy-t2", "portcullis-w2")
ALL_TARGETS = BASE_TARGETS + TWO_CORE_TARGETS


def parse_targets(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_TARGETS]
    if bad:
        raise SystemExit(f"bench: unknown target(s) {', '.join(bad)}; known: {', '.join(ALL_TARGETS)}")
    if "upstream" not in names:
        names.insert(0, "upstream")  # every proxy needs it, and it is the reference
    return names


def start_targets(h: Harness, pki: Pki, names: list[str], *, access_log: bool = True,
                  pin: bool = True) -> tuple[dict[str, Target], dict[str, str | None]]:
    """Start the upstream and the named proxies; returns (targets by name, cpu layout)."""
    proxy_cpu, load_cpu, all_cpu = cpu_layout() if pin else (None, None, None)
    layout = {"proxy": proxy_cpu, "load": load_cpu, "two_core": all_cpu}
    targets: dict[str, Target] = {}
    up = start_upstream(h, load_cpu)
    targets["upstream"] = up
    log(f"bench: upstream on 127.0.0.1:{up.port} (cpu {load_cpu})")
    for n in names:
        if n == "upstream":
            continue
        if n == "nginx":
            t = start_nginx(h, pki, up.port, proxy_cpu, 1, access_log)
        elif n == "nginx-w2":
            t = start_nginx(h, pki, up.port, all_cpu, 2, access_log, name=n)
        elif n == "haproxy":
            t = start_haproxy(h, pki, up.port, proxy_cpu, 1, access_log)
        elif n == "haproxy-t2":
            t = start_haproxy(h, pki, up.port, all_cpu, 2, access_log, name=n)
        elif n == "pyfloor":
            t = start_pyfloor(h, pki, up.port, proxy_cpu)
        elif n == "pyfloor-checks":
            t = start_pyfloor(h, pki, up.port, proxy_cpu, checks=True)
        elif n == "pyfloor-dpop":
            t = start_pyfloor(h, pki, up.port, proxy_cpu, dpop=True)
        elif n == "portcullis":
            t = start_portcullis(h, pki, up.port, proxy_cpu, 1)
        elif n == "portcullis-dpop":
            t = start_portcullis(h, pki, up.port, proxy_cpu, 1, name=n, dpop=True)
        elif n == "portcullis-w2":
            t = start_portcullis(h, pki, up.port, all_cpu, 2, name=n)
        else:  # pragma: no cover - parse_targets checked
            raise SystemExit(f"unknown target {n}")
        if t is not None:
            targets[n] = t
            log(f"bench: {n} on 127.0.0.1:{t.port} (cpu {t.cpus}; {t.note})")
    return targets, layout


def pin_tree(pids: list[int], cpus: str | None) -> None:
    """Set the CPU affinity of every thread of these processes (like `taskset -a -p`)."""
    if cpus is None:
        return
    mask = {int(c) for c in cpus.split(",")}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def latency_layout(targets: dict[str, Target], layout: dict, mode: str) -> Callable[[], None]:
    """Pin for the open-loop phase. `shared`: proxies move to the load-generator core (cross-core
    wake-ups on a VM cost milliseconds at the tail, see bench/README.md); `split`: unchanged.
    Returns a function that restores the closed-loop pinning."""
    if mode == "split" or layout.get("load") is None:
        return lambda: None
    moved = [t for t in targets.values() if t.kind != "upstream"]
    for t in moved:
        pin_tree(t.pids(), layout["load"])

    def restore() -> None:
        for t in moved:
            pin_tree(t.pids(), t.cpus)

    return restore


# ------------------------------------------------------------------------------------------------
# whole-machine accounting: is someone else using the CPUs we measure on?


def machine_cpu() -> dict[str, float]:
    """Seconds of busy (user+nice+system+irq+softirq) and steal time, summed over all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK, "steal": steal / CLK_TCK}


def own_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busiest_processes(interval_s: float = 1.0, top: int = 3) -> tuple[float, list[str]]:
    """(CPUs busy over the interval, top processes by CPU) for a pre-flight idleness check."""
    def snap() -> dict[int, float]:
        return {int(p): cpu_seconds(int(p)) for p in os.listdir("/proc") if p.isdigit()}

    m0, s0 = machine_cpu(), snap()
    time.sleep(interval_s)
    m1, s1 = machine_cpu(), snap()
    busy = (m1["busy"] - m0["busy"]) / interval_s
    deltas = sorted(((s1[p] - s0.get(p, 0.0), p) for p in s1), reverse=True)[:top]
    out = []
    for d, p in deltas:
        if d / interval_s < 0.05:
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:100]
        except OSError:
            cmd = "?"
        out.append(f"pid {p} {d / interval_s * 100:.0f}% {cmd}")
    return busy, out


DISTURBED_CPUS = 0.1


def undisturbed(args, measure) -> dict:
    """Run `measure()`; while other processes (or the hypervisor) took more than DISTURBED_CPUS
    CPUs during it, wait and measure again, up to --retries times. Keeps the least disturbed."""
    best = None
    for attempt in range(args.retries + 1):
        r = measure()
        r["attempts"] = attempt + 1
        noise = r["foreign_cpus"] + r["steal_cpus"]
        if best is None or noise < best["foreign_cpus"] + best["steal_cpus"]:
            best = r
        if noise <= DISTURBED_CPUS or not r.get("alive", True):
            break
        if attempt < args.retries:
            log(f"bench: retrying that run in {args.retry_wait:g} s (attempt {attempt + 2} of "
                f"{args.retries + 1})")
            time.sleep(args.retry_wait)
    best["disturbed"] = best["foreign_cpus"] + best["steal_cpus"] > DISTURBED_CPUS
    return best
