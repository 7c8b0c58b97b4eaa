"""Files laid out the way Kubernetes and operators lay them out, for the demo, tests, the soak and
benchmarks (never used by the sidecar itself, which only reads).

- `projected_swap(base, files, version)`: update a projected volume as kubelet does (the layout
  spiffe-helper output reaches a pod through): a new `..<version>` directory with the files, an
  atomic rename of a fresh symlink over `..data`, and the visible names as symlinks through
  `..data`, so a reader sees either every old file or every new one.
- `targz(files)`: a tar.gz of a source directory as `tar -czf x.tgz -C dir .` makes it (member
  names `./<path>`), plus optional extra members (for tests of hostile archives).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable


def projected_swap(base: Path, files: dict[str, bytes], version: str, *,
                   mode: int | None = None) -> None:
    d = base / f"..{version}"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
        if mode is not None:
            os.chmod(d / name, mode)
    tmp = base / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(d.name)
    os.replace(tmp, base / "..data")
    for name in files:
        link = base / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def targz(files: dict[str, bytes], *, extra: Iterable[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()
