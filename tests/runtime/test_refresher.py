"""File sources and last-good refreshables (DESIGN rule 6)."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.errors import InvalidValue
from proxy.runtime.refresher import Refreshable
from proxy.runtime.sources import FileSource


def parse_int(data: list[bytes], _digests: list[str]) -> int:
    try:
        return int(data[0])
    except ValueError:
        raise InvalidValue("not an integer") from None


def swap(base: Path, name: str, data: bytes, version: str) -> None:
    d = base / f"..{version}"
    d.mkdir()
    (d / name).write_bytes(data)
    tmp = base / "..tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, base / "..data")
    link = base / name
    if not link.is_symlink():
        link.symlink_to(f"..data/{name}")


def test_symlink_swap_is_seen_even_with_identical_mtime_and_size(tmp_path):
    swap(tmp_path, "v", b"1", "a")
    r = Refreshable("policy", "test", [FileSource(str(tmp_path / "v"))], parse_int)
    assert r.poll(1.0) == "changed" and r.value == 1
    assert r.poll(2.0) == "unchanged"
    swap(tmp_path, "v", b"2", "b")
    old = os.stat(tmp_path / "..a" / "v")
    os.utime(tmp_path / "..b" / "v", ns=(old.st_atime_ns, old.st_mtime_ns))  # same mtime and size
    assert r.poll(3.0) == "changed" and r.value == 2


def test_failure_keeps_last_good_counts_and_retries(tmp_path):
    f = tmp_path / "v"
    f.write_bytes(b"7")
    r = Refreshable("policy", "test", [FileSource(str(f))], parse_int, max_staleness_s=10)
    assert r.poll(100.0) == "changed"
    f.write_bytes(b"garbage")
    assert r.poll(101.0) == "failed" and r.value == 7 and r.failures == 1
    assert "not an integer" in r.last_error
    assert r.poll(102.0) == "failed" and r.failures == 2  # re-read every poll while broken
    assert not r.stale(105.0) and r.stale(111.0)  # last success at 100, staleness 10
    f.unlink()
    assert r.poll(112.0) == "failed" and r.value == 7 and "cannot read" in r.last_error
    f.write_bytes(b"8")
    assert r.poll(113.0) == "changed" and r.value == 8 and r.last_error is None
    assert not r.stale(113.0)


def test_touch_without_content_change_is_unchanged(tmp_path):
    f = tmp_path / "v"
    f.write_bytes(b"5")
    r = Refreshable("policy", "test", [FileSource(str(f))], parse_int)
    r.poll(1.0)
    os.utime(f, None)
    f.write_bytes(b"5")
    assert r.poll(2.0) == "unchanged"


def test_multi_file_input_rereads_all_after_a_failure(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"1")

    def same(data, _d):
        if data[0] != data[1]:
            raise InvalidValue("files disagree")
        return int(data[0])
    r = Refreshable("svid", "pair", [FileSource(str(a)), FileSource(str(b))], same)
    assert r.poll(1.0) == "changed"
    a.write_bytes(b"2")  # cert rotated, key not yet
    assert r.poll(2.0) == "failed" and r.value == 1
    b.write_bytes(b"2")  # key follows: the next poll must re-read a as well
    assert r.poll(3.0) == "changed" and r.value == 2


def test_never_loaded_is_stale(tmp_path):
    r = Refreshable("policy", "test", [FileSource(str(tmp_path / "missing"))], parse_int)
    assert r.poll(1.0) == "failed" and r.value is None and r.stale(1.0)
