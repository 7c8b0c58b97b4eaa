"""`portcullis control-plane serve --config FILE` (and `control-plane check FILE`).

Wiring (proxy/cli.py): `from proxy.controlplane.cli import register; register(sub)` where `sub` is
the top-level sub-parsers object; this adds the `control-plane` group.
Exit codes: 0 ok, 2 bad configuration or cannot listen.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from proxy.errors import ConfigError


def _print_config_error(exc: ConfigError) -> None:
    print(f"portcullis control-plane: configuration has {len(exc.problems)} problem(s):",
          file=sys.stderr)
    for line in exc.render().splitlines():
        print(f"  {line}", file=sys.stderr)


def _load(path: str):
    from proxy.controlplane.config import load_config
    from proxy.controlplane.server import ControlPlane

    cfg = load_config(path)
    cp = ControlPlane(cfg)
    cp.load()
    return cfg, cp


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    try:
        cfg, cp = _load(args.config)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(cp.run())
    except ConfigError as exc:  # an initial source that does not validate
        _print_config_error(exc)
        return 2
    except OSError as exc:
        print(f"portcullis control-plane: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        _cfg, cp = _load(args.file)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    assert cp.store is not None
    revs = ", ".join(f"{n}@{cp.store.current_revision(n) or '-'}" for n in cp.store.slots)
    print(f"ok: {args.file}: own SVID {cp.svid_input.value.spiffe_id}, trust domains "
          f"{', '.join(sorted(cp.trust.bundles))}, policy {cp.policy.revision} "
          f"({len(cp.policy.rules)} rules), signing key {cp.store.kid}, bundles {revs}")
    return 0


def register(subparsers: Any) -> None:
    """Add the `control-plane` command group (`serve`, `check`) to the top-level sub-parsers."""
    cp = subparsers.add_parser("control-plane",
                               help="run the bundle control plane (signed bundles over mTLS)")
    sub = cp.add_subparsers(dest="control_plane_command", metavar="SUBCOMMAND")
    s = sub.add_parser("serve", help="serve bundles, publishing, revocations and fleet status")
    s.add_argument("--config", required=True, help="control plane YAML config file")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check", help="validate a control plane config, its policy, keys and state")
    c.add_argument("file")
    c.set_defaults(func=cmd_check)


def main_serve(config: str) -> int:
    """`portcullis control-plane serve --config <config>` without the top-level parser (bench)."""
    return cmd_serve(argparse.Namespace(config=config))


def main(argv: list[str] | None = None) -> int:
    """`python -m proxy.controlplane.cli serve --config FILE` (before the CLI wiring exists)."""
    parser = argparse.ArgumentParser(prog="portcullis")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["control-plane", *(sys.argv[1:] if argv is None else argv)])
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args(["control-plane", "--help"])
        return 2
    return int(func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
