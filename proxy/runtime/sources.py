"""Where refreshable inputs come from. This issue: files (later: HTTP with ETag, Workload API).

Rules:
- A file is watched by polling its *resolved* path (Kubernetes updates a projected volume by
  swapping the `..data` symlink, so the inode behind the name changes while the name does not).
- A poll costs one realpath + stat while nothing changed; contents are read only when the
  (resolved path, inode, mtime, size) tuple moved, or when forced (SIGHUP, or after a failed parse,
  since a half-written file can be completed without its stat tuple changing again).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(slots=True)
class FileRead:
    data: bytes
    digest: str  # hex SHA-256 of the contents


class FileSource:
    def __init__(self, path: str) -> None:
        self.path = path
        self._key: tuple | None = None

    def stat_key(self) -> tuple:
        real = os.path.realpath(self.path)
        st = os.stat(real)
        return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """True when the file may have new contents (raises OSError when it is unreadable)."""
        return self.stat_key() != self._key

    def read(self) -> FileRead:
        key = self.stat_key()
        with open(key[0], "rb") as f:
            data = f.read()
        self._key = key
        return FileRead(data, hashlib.sha256(data).hexdigest())

    def forget(self) -> None:
        """Make the next poll read the file again."""
        self._key = None
