"""Reading and writing policy bundles: directories, tar.gz files and the sidecar's last-good cache.

The format and the trust rules are `proxy.core.bundle`; this module only moves bytes, and what it
returns (`Bundle`) is untrusted until `core.bundle.verify` says otherwise.

Reading (`read_bundle(path)`, `read_targz_bytes(data)`, `read_dir(path)`):
- Limits (`Limits`): at most `max_files` files (manifest and signature included), `max_file_bytes`
  per file, `max_total_bytes` in all (and for the compressed input); the gzip stream is inflated
  with a hard cap, so a decompression bomb stops at the cap. Beyond a limit: BundleError
  `bundle_too_large`.
- Tar members: regular files and directories only. Symbolic and hard links, devices, FIFOs,
  contiguous and sparse files are refused, as are absolute names, `..` or `.` segments (one
  leading `./` is accepted and removed, as `tar -C dir .` writes), empty segments, backslashes,
  control characters, names that are not UTF-8 and duplicate names: BundleError
  `bundle_unsafe_path`. Nothing is ever extracted to disk.
- Directories: walked without following symbolic links; a link, device, FIFO or socket anywhere
  inside is `bundle_unsafe_path`; files are opened with O_NOFOLLOW and re-checked with fstat.
- A corrupt or truncated gzip/tar, or data after the gzip stream: `bundle_unreadable`; no
  `.manifest.json`: `bundle_bad_manifest`. A path that cannot be opened raises `OSError`.
- Safe-but-unlisted names (`.DS_Store`, `notes.txt`) are kept in `Bundle.files`, so that
  `verify` reports them as `bundle_extra_file` and `inspect` shows them.

Writing:
- `to_targz(bundle)` is deterministic: `.manifest.json`, `.signature.json`, then the files in
  sorted order; mtime 0, uid/gid 0, no user/group names, mode 0644, gzip header mtime 0 and no
  file name. The same bundle always gives the same bytes.
- `write_targz(bundle, path)`: temp file in the same directory, fsync, rename over `path`, fsync
  the directory: readers see the old file or the new one, never a partial one.
- `write_dir(bundle, path)`: written into a temp directory next to `path`, fsynced, then renamed
  into place. An existing `path` is replaced only when it is empty or a bundle directory (holds
  `.manifest.json`), via rename-aside: a crash between the two renames leaves the old bundle at
  `.<name>.old-*` and no `path`. The sidecar's cache therefore uses `persist` (one file).
- `persist(vb, directory)` writes `directory/last-good.tar.gz` as `write_targz` does, under an
  exclusive `flock` on `directory/.lock`, and never replaces a persisted bundle of a higher
  revision (several workers may persist at once; the cache must not roll back either). Returns
  whether it wrote. `load_persisted(directory)` returns the untrusted `Bundle` (or None): the
  caller verifies it again, with its keys, before use.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from proxy.core.bundle import (MANIFEST_NAME, MAX_PATH_CHARS, SIGNATURE_NAME, Bundle,
                               VerifiedBundle, parse_manifest)
from proxy.errors import BundleError

PERSIST_NAME = "last-good.tar.gz"
LOCK_NAME = ".lock"
_STALE_TMP_S = 3600.0
_TAR_OVERHEAD = 4096  # per member: header, pax/long-name headers, padding


@dataclass(frozen=True, slots=True)
class Limits:
    max_total_bytes: int = 32 * 1024 * 1024
    max_files: int = 1000
    max_file_bytes: int = 8 * 1024 * 1024


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe to carry (traversal, absolute, ...), or None."""
    if not name:
        return "empty name"
    if len(name) > MAX_PATH_CHARS:
        return f"name longer than {MAX_PATH_CHARS} characters"
    if name.startswith("/"):
        return "absolute path"
    if "\\" in name:
        return "backslash in name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control character in name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not UTF-8"
    for seg in name.split("/"):
        if seg in ("", ".", ".."):
            return "empty, '.' or '..' segment"
    return None


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.files = 0
        self.total = 0

    def take(self, name: str, size: int) -> None:
        lim = self.limits
        self.files += 1
        if self.files > lim.max_files:
            raise BundleError("bundle_too_large", f"more than {lim.max_files} files")
        if size > lim.max_file_bytes:
            raise BundleError("bundle_too_large",
                              f"{name}: {size} bytes > {lim.max_file_bytes} per file")
        self.total += size
        if self.total > lim.max_total_bytes:
            raise BundleError("bundle_too_large", f"more than {lim.max_total_bytes} bytes in all")


def _assemble(entries: dict[str, bytes], where: str) -> Bundle:
    manifest = entries.pop(MANIFEST_NAME, None)
    if manifest is None:
        raise BundleError("bundle_bad_manifest", f"{where}: no {MANIFEST_NAME}")
    signature = entries.pop(SIGNATURE_NAME, None)
    return Bundle(manifest, signature, MappingProxyType(dict(sorted(entries.items()))))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _gunzip(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip only
    try:
        out = d.decompress(data, cap + 1)
    except zlib.error as exc:
        raise BundleError("bundle_unreadable", f"not a gzip stream: {exc}") from None
    if len(out) > cap or d.unconsumed_tail:
        raise BundleError("bundle_too_large", f"inflates to more than {cap} bytes")
    if not d.eof:
        raise BundleError("bundle_unreadable", "truncated gzip stream")
    if d.unused_data:
        raise BundleError("bundle_unreadable", "data after the gzip stream")
    return out


def read_targz_files(data: bytes, limits: Limits = DEFAULT_LIMITS, *, source: bool = False,
                     skipped: list[str] | None = None) -> dict[str, bytes]:
    """The regular files of tar.gz bytes, under the module's member rules (regular files and
    directories only, no links or devices, no absolute, `..` or empty segments, no duplicates,
    the limits, a capped inflate). `source=True` reads a source directory as `tar -czf` makes
    it: directory entries may end in "/", and hidden entries (a segment starting with ".", e.g.
    an old `.manifest.json` or macOS `._*` files) are skipped and listed in `skipped`."""
    if len(data) > limits.max_total_bytes:
        raise BundleError("bundle_too_large", f"archive larger than {limits.max_total_bytes} bytes")
    cap = limits.max_total_bytes + (limits.max_files + 2) * _TAR_OVERHEAD
    raw = _gunzip(data, cap)
    budget = _Budget(limits)
    entries: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            while (m := tf.next()) is not None:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if source and m.isdir():
                    name = name.rstrip("/")
                if m.isdir() and name in ("", "."):
                    continue
                why = unsafe_name(name)
                if why:
                    raise BundleError("bundle_unsafe_path", f"tar member {m.name!r}: {why}")
                if name in seen:
                    raise BundleError("bundle_unsafe_path", f"tar member {name!r} appears twice")
                seen.add(name)
                if m.isdir():
                    continue
                if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse():
                    kind = ("symbolic link" if m.issym() else "hard link" if m.islnk()
                            else "device" if m.isdev() else f"type {m.type!r}")
                    raise BundleError("bundle_unsafe_path",
                                      f"tar member {name!r} is a {kind}, not a regular file")
                if source and any(seg.startswith(".") for seg in name.split("/")):
                    if skipped is not None:
                        skipped.append(name)
                    continue
                budget.take(name, m.size)
                f = tf.extractfile(m)
                content = f.read() if f is not None else b""
                if len(content) != m.size:
                    raise BundleError("bundle_unreadable", f"tar member {name!r} is truncated")
                entries[name] = content
    except tarfile.TarError as exc:
        raise BundleError("bundle_unreadable", f"not a valid tar archive: {exc}") from None
    except EOFError:
        raise BundleError("bundle_unreadable", "truncated tar archive") from None
    return entries


def read_targz_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """A bundle from tar.gz bytes (a file, or a response body). See the module rules."""
    return _assemble(read_targz_files(data, limits), "archive")


def _read_regular(path: Path, rel: str, budget: _Budget) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError("bundle_unsafe_path", f"{rel!r} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError("bundle_unsafe_path", f"{rel!r} is not a regular file")
        budget.take(rel, st.st_size)
        data = f.read(budget.limits.max_file_bytes + 1)
    if len(data) > budget.limits.max_file_bytes:  # grew while being read
        raise BundleError("bundle_too_large",
                          f"{rel}: more than {budget.limits.max_file_bytes} bytes per file")
    if len(data) != st.st_size:
        raise BundleError("bundle_unreadable", f"{rel!r} changed while being read")
    return data


def _walk(root: Path, limits: Limits, skip_hidden: bool,
          skipped: list[str] | None) -> dict[str, bytes]:
    budget = _Budget(limits)
    entries: dict[str, bytes] = {}

    def visit(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
        for e in items:
            rel = prefix + e.name
            why = unsafe_name(rel)
            if why:
                raise BundleError("bundle_unsafe_path", f"{rel!r}: {why}")
            if skip_hidden and e.name.startswith("."):
                if skipped is not None:
                    skipped.append(rel + ("/" if e.is_dir(follow_symlinks=False) else ""))
                continue
            if e.is_symlink():
                raise BundleError("bundle_unsafe_path", f"{rel!r} is a symbolic link")
            if e.is_dir(follow_symlinks=False):
                visit(Path(e.path), rel + "/")
            elif e.is_file(follow_symlinks=False):
                entries[rel] = _read_regular(Path(e.path), rel, budget)
            else:
                raise BundleError("bundle_unsafe_path",
                                  f"{rel!r} is not a regular file or directory")

    visit(root, "")
    return entries


def read_dir(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """A bundle from a directory holding `.manifest.json`, the signature and the files."""
    return _assemble(_walk(Path(path), limits, False, None), str(path))


def read_source_dir(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS,
                    skipped: list[str] | None = None) -> dict[str, bytes]:
    """The files to build a bundle from: every regular file under `path`, except hidden entries
    (name starting with "."; appended to `skipped`), which include an old manifest and signature.
    Links and special files are `bundle_unsafe_path`."""
    return _walk(Path(path), limits, True, skipped)


def read_bundle(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """A bundle from a directory or a tar.gz file."""
    p = Path(path)
    if p.is_dir():
        return read_dir(p, limits)
    with open(p, "rb") as f:
        data = f.read(limits.max_total_bytes + 1)
    return read_targz_bytes(data, limits)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _members(bundle: Bundle) -> list[tuple[str, bytes]]:
    out = [(MANIFEST_NAME, bundle.manifest_bytes)]
    if bundle.signature_bytes is not None:
        out.append((SIGNATURE_NAME, bundle.signature_bytes))
    for name in sorted(bundle.files):
        why = unsafe_name(name)
        if why or name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleError("bundle_unsafe_path", f"{name!r}: {why or 'reserved name'}")
        out.append((name, bundle.files[name]))
    return out


def to_targz(bundle: Bundle) -> bytes:
    """Deterministic tar.gz bytes of `bundle`."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for name, content in _members(bundle):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tf.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(tar_buf.getvalue())
    return out.getvalue()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one,
    never a mix: a temporary file in the same directory, fsync, rename over `path`, and (unless
    the caller syncs the directory itself later) fsync of the directory."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)


def write_targz(bundle: Bundle, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    atomic_write(p, to_targz(bundle))
    return p


def write_dir(bundle: Bundle, path: str | os.PathLike[str]) -> Path:
    """Write `bundle` as a directory (see the module rules for replacing an existing one)."""
    p = Path(path)
    members = _members(bundle)
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_dir():
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(p))
        if any(p.iterdir()) and not (p / MANIFEST_NAME).is_file():
            raise FileExistsError(errno.EEXIST, "exists and is not a bundle directory", str(p))
    parent = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{p.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        dirs = {tmp}
        for name, content in members:
            target = tmp / name
            if target.parent not in dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                dirs.update([target.parent, *target.parent.parents])
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        for d in sorted((d for d in dirs if d == tmp or tmp in d.parents),
                        key=lambda d: len(d.parts), reverse=True):
            fsync_dir(d)
        if p.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{p.name}.old-"))
            os.rename(p, old / "b")
            os.rename(tmp, p)
            fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, p)
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return p


# --------------------------------------------------------------------------------------------
# The sidecar's last-good cache
# --------------------------------------------------------------------------------------------


def _clean_stale_temps(directory: Path) -> None:
    prefix = f".{PERSIST_NAME}.tmp-"
    cutoff = time.time() - _STALE_TMP_S  # another worker's fresh temp file is left alone
    for e in os.scandir(directory):
        if e.name.startswith(prefix) and e.is_file(follow_symlinks=False):
            try:
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(e.path)
            except FileNotFoundError:
                pass


def persist(vb: VerifiedBundle, directory: str | os.PathLike[str],
            limits: Limits = DEFAULT_LIMITS) -> bool:
    """Keep `vb` as the last good bundle in `directory`; False when a bundle of a higher revision
    (or the same revision) is already kept there."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        _clean_stale_temps(d)
        try:
            current = load_persisted(d, limits)
            kept = None if current is None else parse_manifest(current.manifest_bytes).revision
        except (BundleError, OSError):
            kept = None  # a corrupt cache entry is replaced
        if kept is not None and kept >= vb.revision:
            return False
        atomic_write(d / PERSIST_NAME, to_targz(vb.bundle()))
        return True
    finally:
        os.close(lock_fd)  # releases the lock


def load_persisted(directory: str | os.PathLike[str],
                   limits: Limits = DEFAULT_LIMITS) -> Bundle | None:
    """The kept bundle (untrusted: verify it before use), or None when there is none."""
    p = Path(directory) / PERSIST_NAME
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limits.max_total_bytes + 1)
    return read_targz_bytes(data, limits)
