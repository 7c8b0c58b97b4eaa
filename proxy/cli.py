"""The `portcullis` command (also `python -m proxy`).

Subcommands:
  serve --config FILE [--workers N]   run the sidecar
  config check FILE                   validate config + policy + key material; every problem with
                                      its key path on stderr, exit 2 when there is one
  audit verify FILE [--public-key K]  verify the hash chain and signed checkpoints of an audit log
  bundle build | verify | inspect     signed policy bundles (see proxy/core/bundle.py)
  control-plane serve | check         the control plane: bundles, revocations, fleet status
  policy test DIR | explain           run policy test cases (like `opa test`); explain one decision
  dev ca | svid | keypair             mint throw-away dev CAs, X.509-SVIDs and audit keys
  dev issuer | token | dpop-key | dpop  a dev authorization server: JWKS, access tokens, DPoP proofs
  demo                                run the local mesh demo (what `make demo` does)
Exit codes: 0 ok, 1 verification failed, 2 bad input/configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from proxy import __version__
from proxy.errors import ConfigError


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _print_config_error(exc: ConfigError) -> None:
    print(f"portcullis: configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
    for line in exc.render().splitlines():
        print(f"  {line}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.config import load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    _setup_logging(cfg.server.log_level)
    workers = args.workers or cfg.server.workers
    if workers > 1:
        from proxy.runtime.supervisor import run_supervisor

        return run_supervisor(args.config, cfg, workers)
    return run_single(cfg)


def run_single(cfg) -> int:
    import uvloop

    from proxy.runtime.server import Worker

    worker = Worker(cfg)
    try:
        worker.load()
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    try:
        uvloop.run(worker.run())
    except OSError as exc:
        print(f"portcullis: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from proxy.config import load_config
    from proxy.runtime.server import Worker

    try:
        cfg = load_config(args.file)
        worker = Worker(cfg)
        worker.load()
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    st = worker.state
    print(f"ok: {args.file}: own SVID {st.own_id}, trust domains "
          f"{', '.join(sorted(st.trust.bundles))}, policy {st.policy.revision} "
          f"({len(st.policy.rules)} rules), mode {st.mode}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from proxy.core.audit import format_report, verify_lines

    key = None
    if args.public_key:
        try:
            key = serialization.load_pem_public_key(Path(args.public_key).read_bytes())
        except (OSError, ValueError) as exc:
            print(f"portcullis audit verify: cannot load public key: {exc}", file=sys.stderr)
            return 2
        if not isinstance(key, Ed25519PublicKey):
            print("portcullis audit verify: the public key must be Ed25519", file=sys.stderr)
            return 2
    try:
        if args.file == "-":
            report = verify_lines(sys.stdin.buffer, key)
        else:
            with open(args.file, "rb") as f:
                report = verify_lines(f, key)
    except OSError as exc:
        print(f"portcullis audit verify: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo.run import main as demo_main

    return demo_main(keep=args.keep)


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="portcullis",
        description="Identity-aware mTLS sidecar: proves the calling workload, decides, forwards, audits.")
    p.add_argument("--version", action="version", version=f"portcullis {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the sidecar")
    s.add_argument("--config", required=True, help="sidecar YAML config file")
    s.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: server.workers from the config)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    cc = csub.add_parser("check", help="validate a config file, its policy and key material")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config_check)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    av = asub.add_parser("verify", help="verify the hash chain and signed checkpoints")
    av.add_argument("file", help="audit log (JSON lines), or - for stdin")
    av.add_argument("--public-key", help="Ed25519 public key (PEM) that signs checkpoints")
    av.set_defaults(func=cmd_audit_verify)

    b = sub.add_parser("bundle", help="signed policy bundles: build, verify, inspect")
    bsub = b.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND")
    from proxy.bundles.cli import register as register_bundle

    register_bundle(bsub)

    from proxy.policytools.cli import register as register_policy

    register_policy(sub)

    from proxy.controlplane.cli import register as register_cp

    register_cp(sub)

    d = sub.add_parser("dev", help="dev CA, SVIDs and keys for tests and demos (never production)")
    dsub = d.add_subparsers(dest="dev_command", metavar="SUBCOMMAND")
    from proxy.dev.cli import register

    register(dsub)

    dm = sub.add_parser("demo", help="run the local mesh demo on 127.0.0.1")
    dm.add_argument("--keep", action="store_true", help="keep the demo directory afterwards")
    dm.set_defaults(func=cmd_demo)
    return p


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--opt VALUE` -> `--opt=VALUE` for the options whose values may begin with "-"
    (`proxy.dev.cli.DASH_VALUE_OPTIONS`), so that both spellings work for any value."""
    from proxy.dev.cli import DASH_VALUE_OPTIONS

    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":  # everything after it is positional, as argparse reads it
            out.append(arg)
            out.extend(it)
            break
        if arg in DASH_VALUE_OPTIONS:
            value = next(it, None)
            out.append(arg if value is None else f"{arg}={value}")
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_dash_values(list(argv) if argv is not None else sys.argv[1:])
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # a group without its subcommand: show that group's usage
        parser.parse_args(argv + ["--help"])
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
