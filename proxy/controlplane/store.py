"""Durable, signed, monotonic bundle revisions: what the control plane serves and publishes.

Rules:
- A revision is built with `core.bundle.build` (files + manifest, signed by the control plane's key),
  serialised with `bundles.io.to_targz` (deterministic) and served as exactly those bytes; its ETag
  is the manifest digest.
- Revision numbers only grow: the next one is the highest ever written + 1 (`latest.json` records
  the highest written; a state directory holding less than it names is refused at start).
  Rollback republishes old content under a NEW revision; nothing ever serves a lower revision.
- Every publish is validated first (`validate_files`): the policy must compile
  (`core.policy.compile_policy`), `data/revocations.json` must have its shape, paths must be
  bundle paths; all problems are reported together (400).
- Durability: `<state>/bundles/<name>/r<revision>.tar.gz` and `r<revision>.json` (who, why, when)
  are written atomically (temp file, fsync, rename, fsync dir), then `latest.json`; only after that
  is the revision served. A crash leaves the old revision or the new one, never a partial file.
  The last `keep_revisions` revisions are kept (rollback targets); older ones are deleted.
- At start every bundle's newest revision is read back and verified with the signing key (and any
  configured previous public keys); one signed by a previous key is re-signed under a new revision;
  one that does not verify stops the start (never served, never re-signed).
- Long polling: each bundle has an `asyncio.Event` that is set (and replaced) on every new
  revision, so one publish wakes every waiting request at once, without polling.
- One process owns a state directory (`flock` on `<state>/.lock` while serving).
- Publishes of one bundle are serialised by a per-bundle lock; the CPU and disk work runs in a
  worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from proxy.bundles.io import (Limits, atomic_write, read_source_dir, read_targz_bytes,
                              read_targz_files, to_targz)
from proxy.config import compile_policy_bytes
from proxy.controlplane import revocations as rv
from proxy.controlplane.config import BundleConfig
from proxy.core import bundle as cb
from proxy.errors import BundleError, ConfigError, InvalidValue, Problem

log = logging.getLogger("portcullis.controlplane.store")

_REVISION_FILE = re.compile(r"r(\d{12})\.tar\.gz")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


class PublishRejected(Exception):
    """The content cannot be published: `code` is stable, `problems` lists every reason."""

    def __init__(self, code: str, problems: Sequence[dict[str, str]]) -> None:
        super().__init__(f"{code}: {len(problems)} problem(s)")
        self.code = code
        self.problems = list(problems)


class RevisionNotFound(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Revision:
    """One published revision as served: the exact tar.gz bytes and the metadata around them."""

    bundle: str
    revision: int
    digest: str
    created_at: float
    expires_at: float | None
    origin: str  # initial | publish | rollback | revocations | resign | refresh
    by: str | None  # SPIFFE ID of the caller (None: the control plane itself)
    from_revision: int | None
    targz: bytes = field(repr=False)
    files: Mapping[str, bytes] = field(repr=False)

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'

    def meta(self) -> dict[str, Any]:
        return {"revision": self.revision, "digest": self.digest, "created_at": self.created_at,
                "expires_at": self.expires_at, "origin": self.origin, "by": self.by,
                "from_revision": self.from_revision, "size_bytes": len(self.targz)}


# --------------------------------------------------------------------------------------------
# Validation and source archives (pure)
# --------------------------------------------------------------------------------------------


def _problem(file: str, path: str, message: str) -> dict[str, str]:
    return {"file": file, "path": path, "message": message}


def validate_files(files: Mapping[str, bytes], *, revision: int,
                   trust_domains: frozenset[str] | None,
                   max_revocation_entries: int | None) -> list[dict[str, str]]:
    """Every reason `files` cannot become a bundle (empty list: it can)."""
    problems: list[dict[str, str]] = []
    for p in sorted(files):
        why = cb.check_path(p)
        if why:
            problems.append(_problem(p, "", f"not a bundle path: {why}"))
    policy = files.get(cb.POLICY_NAME)
    if policy is None:
        problems.append(_problem(cb.POLICY_NAME, "", "is required"))
    else:
        try:
            compile_policy_bytes(policy, source=cb.POLICY_NAME, revision=str(revision),
                                 trust_domains=trust_domains)
        except ConfigError as exc:
            problems.extend(_problem(cb.POLICY_NAME, p.path, p.message) for p in exc.problems)
    revs = files.get(cb.REVOCATIONS_NAME)
    if revs is not None:
        try:
            doc = json.loads(revs.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(_problem(cb.REVOCATIONS_NAME, "", f"not valid JSON: {exc}"))
        else:
            _, found = rv.parse(doc, max_entries=max_revocation_entries)
            problems.extend(_problem(cb.REVOCATIONS_NAME, p.path, p.message) for p in found)
            if not found:
                try:
                    cb.parse_revocations(revs)
                except BundleError as exc:
                    problems.append(_problem(cb.REVOCATIONS_NAME, "", exc.detail))
    return problems


def read_source_targz(data: bytes, limits: Limits,
                      skipped: list[str] | None = None) -> dict[str, bytes]:
    """The files of an uploaded source archive (tar.gz of a source directory: `policy.yaml`,
    `data/...`): `bundles.io.read_targz_files` in source mode (no manifest expected; hidden
    entries skipped and listed in `skipped`). BundleError `bundle_unreadable` /
    `bundle_unsafe_path` / `bundle_too_large`."""
    return read_targz_files(data, limits, source=True, skipped=skipped)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _rev_name(revision: int, ext: str) -> str:
    return f"r{revision:012d}.{ext}"


# --------------------------------------------------------------------------------------------
# One bundle
# --------------------------------------------------------------------------------------------


class BundleSlot:
    """The served state of one bundle: current revision, retained history, long-poll event."""

    def __init__(self, cfg: BundleConfig, directory: Path) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dir = directory
        self.current: Revision | None = None
        self.high_water = 0  # highest revision ever written (latest.json)
        self.history: list[dict[str, Any]] = []  # meta of retained revisions, oldest first
        self.changed = asyncio.Event()
        self.lock = asyncio.Lock()
        self.waiting = 0  # long polls parked on `changed` (status, tests, bench)
        self.refresh_failed_for: int | None = None  # revision whose re-signing was rejected

    def install(self, rev: Revision) -> None:
        """Serve `rev` and wake every long poll waiting on the previous revision."""
        self.current = rev
        self.high_water = max(self.high_water, rev.revision)
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def wake_all(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()


class BundleStore:
    def __init__(self, state_dir: str | os.PathLike[str], bundles: Sequence[BundleConfig], *,
                 signer: cb.PrivateKey, previous_keys: Sequence[cb.PublicKey] = (),
                 keep_revisions: int, limits: Limits, max_revocation_entries: int,
                 clock: Callable[[], float]) -> None:
        self.root = Path(state_dir) / "bundles"
        self.signer = signer
        self.public_key = signer.public_key()
        self.kid = cb.key_id(self.public_key)
        self.trusted_keys = [self.public_key, *previous_keys]
        self.keep = keep_revisions
        self.limits = limits
        self.max_revocation_entries = max_revocation_entries
        self.clock = clock
        self.slots = {b.name: BundleSlot(b, self.root / b.name) for b in bundles}
        self.closing = False
        self._lock_fd: int | None = None

    # -- start ---------------------------------------------------------------------------------

    def lock_state(self) -> None:
        """Take the state directory for this process (`flock` on `<state>/.lock`): two control
        planes writing one state directory could hand out one revision number twice."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError([Problem("state.dir", f"{self.root.parent} is in use by another "
                                                    "control plane process")]) from None
        self._lock_fd = fd

    def unlock_state(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def load(self) -> list[tuple[str, str]]:
        """Read every bundle's state (blocking; call before serving). Returns the work to do
        before serving: (bundle, "resign" | "initial"). Raises ConfigError listing every bundle
        whose state cannot be trusted."""
        problems: list[Problem] = []
        todo: list[tuple[str, str]] = []
        for name, slot in self.slots.items():
            try:
                action = self._load_slot(slot)
            except (OSError, BundleError, ValueError, KeyError, TypeError) as exc:
                problems.append(Problem(f"state {slot.dir}", str(exc)))
                continue
            if action:
                todo.append((name, action))
        if problems:
            raise ConfigError(problems)
        return todo

    def _load_slot(self, slot: BundleSlot) -> str | None:
        if not slot.dir.exists():  # created by the first publish (`check` writes nothing)
            return "initial" if slot.cfg.source_dir else None
        cutoff = time.time() - 3600  # temp files of writes a crash interrupted (not a live one)
        for e in os.scandir(slot.dir):
            if e.name.startswith(".") and ".tmp-" in e.name and e.is_file(follow_symlinks=False) \
                    and e.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(e.path)
        latest = slot.dir / "latest.json"
        floor = 0
        if latest.exists():
            doc = json.loads(latest.read_text())
            floor = int(doc["revision"])
        stored = sorted((int(m.group(1)) for e in os.scandir(slot.dir)
                         if (m := _REVISION_FILE.fullmatch(e.name))), reverse=True)
        for r in stored:
            meta_path = slot.dir / _rev_name(r, "json")
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {"revision": r}
            slot.history.insert(0, meta)
        if not stored:
            if floor:
                raise ValueError(f"latest.json names revision {floor} but no revision is stored")
            slot.high_water = 0
            return "initial" if slot.cfg.source_dir else None
        newest = stored[0]
        if newest < floor:
            raise ValueError(f"latest.json names revision {floor} but the newest stored is "
                             f"{newest}: the state directory was rolled back")
        data = (slot.dir / _rev_name(newest, "tar.gz")).read_bytes()
        vb = self._verify(data, newest)
        meta = slot.history[-1]
        slot.current = Revision(slot.name, vb.revision, vb.digest, vb.created_at, vb.expires_at,
                                meta.get("origin", "publish"), meta.get("by"),
                                meta.get("from_revision"), data, vb.files)
        slot.high_water = max(floor, newest)
        if vb.signed_by != self.kid:
            log.warning("bundle %s: revision %d is signed by retired key %s: re-signing",
                        slot.name, newest, vb.signed_by)
            return "resign"
        return None

    def _verify(self, data: bytes, revision: int) -> cb.VerifiedBundle:
        limits = Limits(max_total_bytes=max(self.limits.max_total_bytes, len(data)),
                        max_files=self.limits.max_files + 2,
                        max_file_bytes=self.limits.max_file_bytes)
        bundle = read_targz_bytes(data, limits)
        # expiry is not this check's business (an expired revision is re-signed by `refresh`)
        vb = cb.verify(bundle, public_keys=self.trusted_keys, require_signature=True,
                       now=self.clock(), active_revision=None, grace_s=float("inf"))
        if vb.revision != revision:
            raise BundleError("bundle_bad_manifest",
                              f"file of revision {revision} holds revision {vb.revision}")
        return vb

    async def start(self, todo: list[tuple[str, str]]) -> None:
        """Do what `load` found: re-sign revisions of retired keys, publish initial sources."""
        for name, action in todo:
            slot = self.slots[name]
            if action == "resign":
                assert slot.current is not None
                try:
                    await self.publish(name, slot.current.files, origin="resign", by=None)
                except PublishRejected as exc:
                    raise ConfigError([Problem(f"state {slot.dir}",
                                               f"cannot re-sign revision {slot.current.revision}:"
                                               f" {p['file']}: {p['path']}: {p['message']}")
                                       for p in exc.problems]) from None
            elif action == "initial":
                skipped: list[str] = []
                try:
                    files = await asyncio.to_thread(read_source_dir, slot.cfg.source_dir,
                                                    self.limits, skipped)
                except (OSError, BundleError) as exc:
                    raise ConfigError([Problem(f"bundles[{name}].source_dir", str(exc))]) from None
                try:
                    await self.publish(name, files, origin="initial", by=None)
                except PublishRejected as exc:
                    raise ConfigError([Problem(f"bundles[{name}].source_dir",
                                               f"{p['file']}: {p['path']}: {p['message']}")
                                       for p in exc.problems]) from None

    # -- reading -------------------------------------------------------------------------------

    def slot(self, name: str) -> BundleSlot | None:
        return self.slots.get(name)

    def current_revision(self, name: str) -> int | None:
        slot = self.slots.get(name)
        return None if slot is None or slot.current is None else slot.current.revision

    def listing(self, name: str) -> dict[str, Any]:
        slot = self.slots[name]
        cur = slot.current
        return {"bundle": name, "current": None if cur is None else cur.meta(),
                "kid": self.kid, "keep_revisions": self.keep,
                "long_polls_waiting": slot.waiting,
                "revisions": list(reversed(slot.history))}

    async def wait_change(self, slot: BundleSlot, seen: Revision | None, timeout: float) -> bool:
        """Wait until `slot` serves something other than `seen` (True), or the store closes or
        `timeout` seconds pass (False). One event per bundle: no polling."""
        slot.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while slot.current is seen and not self.closing:
                    await slot.changed.wait()
        except TimeoutError:
            pass
        finally:
            slot.waiting -= 1
        return slot.current is not seen

    def close(self) -> None:
        """Release every long poll (they answer at once)."""
        self.closing = True
        for slot in self.slots.values():
            slot.wake_all()

    # -- writing -------------------------------------------------------------------------------

    async def publish(self, name: str, files: Mapping[str, bytes], *, origin: str,
                      by: str | None, from_revision: int | None = None) -> Revision:
        slot = self.slots[name]
        async with slot.lock:
            rev = await asyncio.to_thread(self._build_and_write, slot, dict(files), origin, by,
                                          from_revision)
            slot.install(rev)
        log.info("bundle %s: revision %d published (%s%s)", name, rev.revision, origin,
                 f" by {by}" if by else "")
        return rev

    def _build_and_write(self, slot: BundleSlot, files: dict[str, bytes], origin: str,
                         by: str | None, from_revision: int | None) -> Revision:
        revision = slot.high_water + 1
        problems = validate_files(files, revision=revision,
                                  trust_domains=(frozenset(slot.cfg.trust_domains)
                                                 if slot.cfg.trust_domains else None),
                                  max_revocation_entries=self.max_revocation_entries)
        if problems:
            raise PublishRejected("bundle_invalid", problems)
        now = self.clock()
        ttl = slot.cfg.expires_after_s
        try:
            bundle = cb.build(files, revision=revision, now=now,
                              expires_at=(now + ttl) if ttl > 0 else None, signer=self.signer)
        except BundleError as exc:
            raise PublishRejected("bundle_invalid", [_problem("", "", f"{exc.code}: {exc.detail}")])
        data = to_targz(bundle)
        vb = cb.verify(bundle, public_keys=[self.public_key], require_signature=True, now=now,
                       active_revision=None)
        rev = Revision(slot.name, revision, vb.digest, vb.created_at, vb.expires_at, origin, by,
                       from_revision, data, vb.files)
        slot.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(slot.dir / _rev_name(revision, "tar.gz"), data, sync_dir=False)
        atomic_write(slot.dir / _rev_name(revision, "json"),
                     json.dumps(rev.meta(), sort_keys=True).encode() + b"\n", sync_dir=False)
        atomic_write(slot.dir / "latest.json",
                     json.dumps({"revision": revision, "digest": vb.digest}).encode() + b"\n")
        slot.high_water = revision  # from here on this number is used, served or not
        slot.history.append(rev.meta())
        self._prune(slot)
        return rev

    def _prune(self, slot: BundleSlot) -> None:
        while len(slot.history) > self.keep:
            old = slot.history.pop(0)
            for ext in ("tar.gz", "json"):
                try:
                    os.unlink(slot.dir / _rev_name(int(old["revision"]), ext))
                except FileNotFoundError:
                    pass

    async def rollback(self, name: str, to_revision: int, *, by: str | None) -> Revision:
        slot = self.slots[name]
        if not any(m.get("revision") == to_revision for m in slot.history):
            raise RevisionNotFound(to_revision)
        try:
            data = await asyncio.to_thread(
                (slot.dir / _rev_name(to_revision, "tar.gz")).read_bytes)
        except FileNotFoundError:
            raise RevisionNotFound(to_revision) from None
        vb = await asyncio.to_thread(self._verify, data, to_revision)
        return await self.publish(name, vb.files, origin="rollback", by=by,
                                  from_revision=to_revision)

    async def change_revocations(self, name: str, change: cb.Revocations, *, add: bool,
                                 by: str | None) -> tuple[Revision | None, bool]:
        """Add (or remove) revocations. Returns (served revision, whether a new one was made).
        Raises RevisionNotFound when the bundle has no revision to change yet."""
        slot = self.slots[name]
        async with slot.lock:
            cur = slot.current
            if cur is None:
                raise RevisionNotFound(0)
            data = cur.files.get(cb.REVOCATIONS_NAME)
            before = cb.EMPTY_REVOCATIONS if data is None else cb.parse_revocations(data)
            after = rv.union(before, change) if add else rv.difference(before, change)
            if after == before:
                return cur, False
            if rv.count(after) > self.max_revocation_entries:
                raise PublishRejected("revocations_too_many", [_problem(
                    cb.REVOCATIONS_NAME, "", f"{rv.count(after)} entries, at most "
                                             f"{self.max_revocation_entries}")])
            files = dict(cur.files)
            files[cb.REVOCATIONS_NAME] = rv.render(after)
            rev = await asyncio.to_thread(self._build_and_write, slot, files, "revocations", by,
                                          None)
            slot.install(rev)
        log.info("bundle %s: revision %d published (revocations %s by %s)", name, rev.revision,
                 "added" if add else "removed", by)
        return rev, True

    async def refresh_expiring(self, now: float) -> list[Revision]:
        """Re-sign (same files, new revision) every bundle whose current revision has used half
        of its `expires_after_s`, so that sidecars never hold an expired bundle."""
        out = []
        for name, slot in self.slots.items():
            cur, ttl = slot.current, slot.cfg.expires_after_s
            if cur is None or ttl <= 0 or slot.refresh_failed_for == cur.revision:
                continue
            if cur.expires_at is None or cur.expires_at - now <= ttl / 2:
                try:
                    out.append(await self.publish(name, cur.files, origin="refresh", by=None))
                except PublishRejected as exc:  # e.g. a stricter compiler: say so once
                    slot.refresh_failed_for = cur.revision
                    log.error("bundle %s: cannot re-sign revision %d before it expires: %s",
                              name, cur.revision, "; ".join(
                                  f"{p['file']}: {p['path']}: {p['message']}"
                                  for p in exc.problems))
        return out


def load_signing_key(path: str) -> cb.PrivateKey:
    """An Ed25519 or P-256 private key (unencrypted PKCS#8 PEM); ConfigError otherwise."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("signing.key_file", f"cannot read: {exc.strerror}")]) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
        cb.alg_for(key)
    except (ValueError, TypeError, InvalidValue):
        raise ConfigError([Problem("signing.key_file", "must be an unencrypted PEM Ed25519 or "
                                                       "P-256 private key")]) from None
    return key  # type: ignore[return-value]


def load_public_keys(paths: Sequence[str]) -> list[cb.PublicKey]:
    from cryptography.hazmat.primitives import serialization

    keys, problems = [], []
    for i, path in enumerate(paths):
        where = f"signing.previous_public_key_files[{i}]"
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
            cb.alg_for(key)  # type: ignore[arg-type]
        except OSError as exc:
            problems.append(Problem(where, f"cannot read: {exc.strerror}"))
            continue
        except (ValueError, TypeError, InvalidValue):
            problems.append(Problem(where, "must be a PEM Ed25519 or P-256 public key"))
            continue
        keys.append(key)
    if problems:
        raise ConfigError(problems)
    return keys  # type: ignore[return-value]


__all__ = ["BundleSlot", "BundleStore", "PublishRejected", "Revision", "RevisionNotFound",
           "atomic_write", "load_public_keys", "load_signing_key", "read_source_targz",
           "validate_files"]
