"""`portcullis bundle build | verify | inspect`.

Rules:
- `register(subparsers)` receives the sub-parsers of the `bundle` command (`proxy.cli` creates the
  `bundle` parser, as for `dev`) and adds `build`, `verify` and `inspect`; each sets
  `func=cmd_x`, `cmd_x(args) -> int`. `main(argv)` runs them standalone.
- Exit codes as `proxy.cli`: 0 ok, 1 the bundle failed verification (or inspect found a problem),
  2 bad input (unreadable path, bad key file, a policy that does not compile). Errors go to
  stderr as `portcullis bundle <command>: ...`; key material is never printed.
- `build SRC -o OUT --revision N [--expires-in-s S] [--signing-key K]`: SRC is a directory; every
  regular file under it goes in, except hidden entries (name starting with ".", listed on stderr
  as skipped); links or special files are refused. `policy.yaml` must compile
  (`core.policy.compile_policy`, every problem printed with its path) and
  `data/revocations.json`, if any, must have its shape. OUT ending in `.tar.gz` or `.tgz` is
  written as a deterministic tar.gz, anything else as a directory (an existing directory is
  replaced only if it is empty or already a bundle). K: Ed25519 or P-256 PKCS#8 PEM private key.
- `verify FILE [--public-key K ...] [--min-revision N]`: every rule of `core.bundle.verify` at the
  current time; with keys a signature by one of them is required. Without keys an unsigned bundle
  passes (dev mode) and the output says the signature was not checked.
- `inspect FILE [--public-key K ...]`: manifest, files with sizes and hashes, signature kid, expiry
  and every problem found; works on unsigned and broken bundles.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization

from proxy.bundles import io as bio
from proxy.core import bundle as cb
from proxy.errors import BundleError, ConfigError, InvalidValue


def _err(command: str, message: str) -> None:
    print(f"portcullis bundle {command}: {message}", file=sys.stderr)


def _when(t: float | None) -> str:
    return "never" if t is None else cb.format_time(t)


def _load_public_keys(paths: Sequence[str]) -> list[Any]:
    keys = []
    for p in paths:
        data = Path(p).read_bytes()
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise InvalidValue("not a PEM public key", p) from None
        cb.alg_for(key)
        keys.append(key)
    return keys


def _load_private_key(path: str) -> Any:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InvalidValue("not an unencrypted PEM private key", path) from None
    cb.alg_for(key)
    return key


def _signature_line(sig: cb.Signature | None, signed_by: str | None, keys: bool) -> str:
    if sig is None:
        return "unsigned"
    if signed_by:
        return f"{sig.alg} by kid {signed_by} (verified)"
    return f"{sig.alg} by kid {sig.kid} (NOT checked: no --public-key given)" if not keys \
        else f"{sig.alg} by kid {sig.kid}"


# ----------------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.is_dir():
        _err("build", f"{src}: not a directory")
        return 2
    if args.revision < 1:
        _err("build", "--revision must be a positive integer")
        return 2
    if args.expires_in_s is not None and args.expires_in_s <= 0:
        _err("build", "--expires-in-s must be positive")
        return 2
    skipped: list[str] = []
    try:
        signer = _load_private_key(args.signing_key) if args.signing_key else None
        files = bio.read_source_dir(src, skipped=skipped)
    except (OSError, InvalidValue, BundleError) as exc:
        _err("build", _reason(exc))
        return 2
    for s in skipped:
        _err("build", f"skipped hidden entry {s}")
    if cb.POLICY_NAME not in files:
        _err("build", f"{src}: no {cb.POLICY_NAME}")
        return 2
    if not _policy_compiles(files[cb.POLICY_NAME], str(src / cb.POLICY_NAME), args.revision):
        return 2
    now = time.time()
    expires = None if args.expires_in_s is None else now + args.expires_in_s
    try:
        bundle = cb.build(files, revision=args.revision, now=now, expires_at=expires,
                          signer=signer)
    except (BundleError, InvalidValue) as exc:
        _err("build", _reason(exc))
        return 2
    out = Path(args.output)
    try:
        if out.name.endswith((".tar.gz", ".tgz")):
            bio.write_targz(bundle, out)
        else:
            bio.write_dir(bundle, out)
    except (OSError, BundleError) as exc:
        _err("build", _reason(exc))
        return 2
    sig = None if bundle.signature_bytes is None else cb.parse_signature(bundle.signature_bytes)
    print(f"built: {out}")
    print(f"revision: {args.revision}")
    print(f"digest: sha256:{cb.digest_of(bundle.manifest_bytes)}")
    print(f"expires_at: {_when(None if expires is None else float(int(expires)))}")
    print(f"signature: {'unsigned' if sig is None else f'{sig.alg} by kid {sig.kid}'}")
    print(f"files: {len(bundle.files)}")
    if sig is None:
        _err("build", "warning: the bundle is unsigned; a sidecar with bundle keys refuses it")
    return 0


def _policy_compiles(data: bytes, source: str, revision: int) -> bool:
    from proxy.config import compile_policy_bytes

    try:
        compile_policy_bytes(data, source=source, revision=str(revision))
    except ConfigError as exc:
        _err("build", f"the policy has {len(exc.problems)} problem(s):")
        for line in exc.render().splitlines():
            print(f"  {line}", file=sys.stderr)
        return False
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc)


def _files_table(files: Sequence[cb.FileReport]) -> list[str]:
    width = max((len(f.path) for f in files), default=0)
    out = []
    for f in files:
        size = "-" if f.size is None else f"{f.size} bytes"
        digest = f.sha256 or f.listed_sha256 or "-"
        flag = "" if f.status == "ok" else f"  [{f.status.upper()}]"
        if f.status == "mismatch":
            flag += f" manifest says sha256:{f.listed_sha256}"
        out.append(f"  {f.path:<{width}}  {size:>14}  sha256:{digest}{flag}")
    return out


# ----------------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    try:
        keys = _load_public_keys(args.public_key or [])
        bundle = bio.read_bundle(args.file)
    except (OSError, InvalidValue) as exc:
        _err("verify", _reason(exc))
        return 2
    except BundleError as exc:
        _err("verify", f"FAILED: {exc}")
        return 1
    try:
        vb = cb.verify(bundle, public_keys=keys, require_signature=bool(keys), now=time.time(),
                       active_revision=None)
        if args.min_revision is not None and vb.revision < args.min_revision:
            raise BundleError("bundle_rollback", f"revision {vb.revision} is lower than "
                                                 f"--min-revision {args.min_revision}")
    except BundleError as exc:
        _err("verify", f"FAILED: {exc}")
        return 1
    sig = None if vb.signature_bytes is None else cb.parse_signature(vb.signature_bytes)
    print(f"ok: {args.file}")
    print(f"revision: {vb.revision}")
    print(f"digest: sha256:{vb.digest}")
    print(f"created_at: {_when(vb.created_at)}")
    print(f"expires_at: {_when(vb.expires_at)}")
    print(f"signature: {_signature_line(sig, vb.signed_by, bool(keys))}")
    print(f"files: {len(vb.files)}")
    print("\n".join(_files_table([cb.FileReport(p, len(c), None, cb.digest_of(c), "ok")
                                  for p, c in vb.files.items()])))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        keys = _load_public_keys(args.public_key or [])
        bundle = bio.read_bundle(args.file)
    except (OSError, InvalidValue) as exc:
        _err("inspect", _reason(exc))
        return 2
    except BundleError as exc:
        print(f"bundle: {args.file}")
        print(f"cannot be read: {exc.code}: {exc.detail}")
        return 1
    ins = cb.inspect(bundle, now=time.time(), public_keys=keys)
    m = ins.manifest or {}
    print(f"bundle: {args.file}")
    print(f"revision: {m.get('revision', '-')!s}")
    print(f"digest: sha256:{ins.digest}")
    print(f"created_at: {m.get('created_at', '-')!s}")
    print(f"expires_at: {m.get('expires_at') or 'never'!s}")
    signed_by = None
    if keys and ins.signature is not None and \
            not any(c in ("bundle_bad_signature", "bundle_unknown_key") for c, _ in ins.problems):
        signed_by = ins.signature.kid
    if bundle.signature_bytes is not None and ins.signature is None:
        print("signature: present but malformed")
    else:
        print(f"signature: {_signature_line(ins.signature, signed_by, bool(keys))}")
    print(f"files: {len(ins.files)}")
    print("\n".join(_files_table(ins.files)))
    if ins.ok:
        print("problems: none")
        return 0
    print(f"problems: {len(ins.problems)}")
    for code, detail in ins.problems:
        print(f"  {code}: {detail}" if detail else f"  {code}")
    return 1


# ----------------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add `build`, `verify` and `inspect` to the sub-parsers of the `bundle` command."""
    b = subparsers.add_parser("build", help="build (and sign) a policy bundle from a directory")
    b.add_argument("src", metavar="SRC", help="source directory holding policy.yaml (and data/)")
    b.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: a .tar.gz/.tgz file, or a directory")
    b.add_argument("--revision", type=int, required=True, help="bundle revision (positive, "
                   "higher than every revision published before)")
    b.add_argument("--expires-in-s", type=int, default=None, metavar="S",
                   help="expire S seconds after now (default: never)")
    b.add_argument("--signing-key", metavar="K",
                   help="Ed25519 or P-256 private key, unencrypted PKCS#8 PEM")
    b.set_defaults(func=cmd_build)

    v = subparsers.add_parser("verify", help="verify a bundle (exit 0 valid, 1 invalid)")
    v.add_argument("file", metavar="FILE", help="bundle directory or tar.gz")
    v.add_argument("--public-key", action="append", metavar="K",
                   help="trusted public key (PEM); repeat for several; makes a signature required")
    v.add_argument("--min-revision", type=int, default=None, metavar="N",
                   help="refuse a revision lower than N")
    v.set_defaults(func=cmd_verify)

    i = subparsers.add_parser("inspect", help="show a bundle and everything wrong with it")
    i.add_argument("file", metavar="FILE", help="bundle directory or tar.gz")
    i.add_argument("--public-key", action="append", metavar="K",
                   help="also check the signature against these public keys")
    i.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portcullis bundle", description="policy bundle tools")
    register(p.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
