"""`portcullis demo` (`make demo`): a sample service with a Portcullis sidecar on 127.0.0.1.

It mints a throw-away dev CA and SVIDs, starts the "orders" service and its sidecar, and shows with
curl: an allowed caller getting through, a caller with a different SPIFFE ID denied, callers without
a certificate or from an untrusted CA refused, a path trick rejected; then the audit log, its
verification, and the metrics. Everything runs on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from proxy.dev.ca import DevCA, generate_ed25519_keypair

TD = "example.org"
IDS = {
    "sidecar": f"spiffe://{TD}/ns/demo/sa/orders",
    "frontend": f"spiffe://{TD}/ns/demo/sa/frontend",
    "batch": f"spiffe://{TD}/ns/demo/sa/batch",
}
BOLD, DIM, GREEN, RED, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") \
    if sys.stdout.isatty() else ("", "", "", "", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"\n{BOLD}{text}{RESET}", flush=True)


def make_world(d: Path, port: int, admin: int, app_port: int) -> None:
    ca = DevCA.create(TD)
    ca.write(d / "ca")
    for name, sid in IDS.items():
        ca.issue_svid(sid).write(d / name, bundle_pem=ca.bundle_pem())
    rogue = DevCA.create(TD, common_name="someone else's example.org root")
    rogue.issue_svid(IDS["frontend"]).write(d / "impostor", bundle_pem=rogue.bundle_pem())
    priv, pub = generate_ed25519_keypair()
    (d / "audit.key").write_bytes(priv)
    os.chmod(d / "audit.key", 0o600)
    (d / "audit.pub").write_bytes(pub)
    policy_src = Path(__file__).resolve().parents[2] / "config" / "policy.example.yaml"
    if policy_src.exists():
        shutil.copy(policy_src, d / "policy.yaml")
    else:  # installed without the repository: the same rules, inline
        (d / "policy.yaml").write_text(_FALLBACK_POLICY)
    (d / "sidecar.yaml").write_text(f"""\
# The demo sidecar in front of the "orders" service (see config/sidecar.example.yaml for every key)
listener: {{address: 127.0.0.1, port: {port}}}
identity:
  svid_file: sidecar/svid.pem
  svid_key_file: sidecar/svid_key.pem
  trust_domains: [{{name: {TD}, bundle_file: sidecar/svid_bundle.pem}}]
upstream: {{url: "http://127.0.0.1:{app_port}"}}
policy: {{file: policy.yaml}}
audit: {{signing_key_file: audit.key, checkpoint_every_records: 4}}
admin: {{address: 127.0.0.1, port: {admin}}}
""")


_FALLBACK_POLICY = f"""\
version: 1
revision: demo-1
rules:
  - id: frontend-reads-api
    effect: allow
    from: {{workloads: ["{IDS['frontend']}"]}}
    to: [{{methods: [GET, HEAD], paths: ["/api/**"]}}]
  - id: frontend-places-orders
    effect: allow
    from: {{workloads: ["{IDS['frontend']}"]}}
    to: [{{methods: [POST], paths: ["/api/orders"]}}]
  - id: batch-no-admin
    effect: deny
    from: {{workloads: ["{IDS['batch']}"]}}
    to: [{{paths: ["/api/admin/**"]}}]
"""


def wait_ready(admin: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the sidecar exited; see sidecar.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the sidecar did not become ready")


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def run_curl(d: Path, port: int, who: str | None, path: str, *extra: str, expect: str) -> bool:
    args = ["curl", "-sS", "--cacert", "sidecar/svid_bundle.pem"]
    if who:
        args += ["--cert", f"{who}/svid.pem", "--key", f"{who}/svid_key.pem"]
    args += [*extra, "-w", "\\n-> HTTP %{http_code}\\n", f"https://127.0.0.1:{port}{path}"]
    print(f"{DIM}$ {' '.join(shlex.quote(a) for a in args)}{RESET}")
    r = subprocess.run(args, cwd=d, capture_output=True, text=True, timeout=20)
    out = (r.stdout + r.stderr).strip()
    print(out)
    ok = expect in out
    print(f"{GREEN}as expected{RESET}" if ok else f"{RED}UNEXPECTED (wanted {expect!r}){RESET}")
    return ok


def main(keep: bool = False) -> int:
    if shutil.which("curl") is None:
        print("portcullis demo needs curl (apt-get install curl)", file=sys.stderr)
        return 2
    d = Path(tempfile.mkdtemp(prefix="portcullis-demo-"))
    port, admin, app_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    ok = True
    try:
        say(f"1. A throw-away dev CA for trust domain {TD} and SVIDs in {d}")
        make_world(d, port, admin, app_port)
        for name, sid in IDS.items():
            print(f"   {name:9} {sid}")
        print(f"   impostor  {IDS['frontend']}  (same name, issued by an untrusted CA)")

        say(f"2. The orders service on 127.0.0.1:{app_port} and its sidecar on 127.0.0.1:{port}")
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy.demo.app", "--port", str(app_port)],
                                      cwd=d, stdout=subprocess.DEVNULL, stderr=open(d / "app.log", "wb")))
        wait_port(app_port)
        sidecar = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", "sidecar.yaml"],
                                   cwd=d, stdout=open(d / "audit.jsonl", "wb"),
                                   stderr=open(d / "sidecar.log", "wb"))
        procs.append(sidecar)
        wait_ready(admin, sidecar)
        print(f"   policy: {d / 'policy.yaml'}   audit log (stdout): {d / 'audit.jsonl'}")

        say("3. The frontend may read and place orders")
        ok &= run_curl(d, port, "frontend", "/api/orders/8831", expect="HTTP 200")
        ok &= run_curl(d, port, "frontend", "/api/orders", "-X", "POST", "-d", '{"item": 1}',
                       expect="HTTP 200")
        say("4. The batch job has a different SPIFFE ID: denied")
        ok &= run_curl(d, port, "batch", "/api/admin/users", expect="HTTP 403")
        ok &= run_curl(d, port, "batch", "/api/orders", "-X", "POST", expect="HTTP 403")
        say("5. No client certificate, or one from an untrusted CA: refused in the TLS handshake")
        ok &= run_curl(d, port, None, "/api/orders", expect="HTTP 000")
        ok &= run_curl(d, port, "impostor", "/api/orders", expect="HTTP 000")
        say("6. A path trick is rejected before the policy sees it")
        ok &= run_curl(d, port, "frontend", "/api/orders/../admin/users", "--path-as-is",
                       expect="HTTP 400")

        say("7. Metrics (excerpt of http://127.0.0.1:%d/metrics)" % admin)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(("portcullis_requests_total", "portcullis_tls_handshake_failures_total")):
                    print("   " + line)

        say("8. SIGTERM: drain, seal the audit log with a final signed checkpoint")
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(timeout=30)
        print(f"   sidecar exited with status {sidecar.returncode}")
        ok &= sidecar.returncode == 0

        say("9. The audit log: one record per decision")
        for line in (d / "audit.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["type"] == "decision":
                who = (rec.get("workload") or {}).get("spiffe_id", "-")
                print(f"   {rec['decision']:5} {rec['code']:18} {rec['method']:4} {rec['path']:24} "
                      f"{who}  rule={rec['rule_id']}")
            else:
                print(f"   {rec['type']:5} seq={rec['seq']} final={rec.get('final')} signed={'sig' in rec}")
        cmd = [sys.executable, "-m", "proxy", "audit", "verify", "audit.jsonl", "--public-key", "audit.pub"]
        print(f"{DIM}$ portcullis audit verify audit.jsonl --public-key audit.pub{RESET}")
        v = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        print(v.stdout.strip())
        ok &= v.returncode == 0
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"{RED}demo failed: {exc}{RESET}", file=sys.stderr)
        for log in ("sidecar.log", "app.log"):
            if (d / log).exists():
                print(f"--- {log}\n{(d / log).read_text()[-3000:]}", file=sys.stderr)
        ok = False
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if keep or not ok:
            print(f"\nfiles kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    say("Demo complete." if ok else "Demo finished with unexpected results.")
    return 0 if ok else 1
