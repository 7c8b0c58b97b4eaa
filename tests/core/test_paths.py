"""proxy.core.paths: request-target canonicalisation (table from tests/vectors/paths.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core import paths
from proxy.core.model import Target
from proxy.core.paths import canonicalize_path, canonicalize_target
from proxy.errors import BadRequest

VECTORS = yaml.safe_load((Path(__file__).parent.parent / "vectors" / "paths.yaml").read_text())
CASES = VECTORS["cases"]


def test_vector_ids_are_unique() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [c for c in CASES if "error" not in c], ids=lambda c: c["id"])
def test_canonical_form(case: dict) -> None:
    assert canonicalize_target(case["target"]) == Target(case["path"], case["query"])


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=lambda c: c["id"])
def test_rejected(case: dict) -> None:
    with pytest.raises(BadRequest) as info:
        canonicalize_target(case["target"])
    assert info.value.code == case["error"]
    assert info.value.status == 400
    assert info.value.detail  # the reason reaches the audit log


@pytest.mark.parametrize("case", [c for c in CASES if "error" not in c], ids=lambda c: c["id"])
def test_canonical_form_is_a_fixed_point(case: dict) -> None:
    once = canonicalize_target(case["target"])
    assert canonicalize_target(once.request_target) == once


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/", "/"), ("//a//b/", "/a/b/"), ("/%7euser", "/~user"), ("/x%c3%a9", "/x%C3%A9")],
)
def test_canonicalize_path(path: str, expected: str) -> None:
    assert canonicalize_path(path) == expected


@pytest.mark.parametrize("path", ["", "a", "/a?b", "/a#b", "/a/../b", "/a;b", "/a%2Fb", "/a b"])
def test_canonicalize_path_rejects_with_invalid_path(path: str) -> None:
    with pytest.raises(BadRequest) as info:
        canonicalize_path(path)
    assert info.value.code == "invalid_path"


# ---- properties ---------------------------------------------------------------------------------

# Biased towards the interesting characters, plus arbitrary text.
_ALPHABET = st.sampled_from(list("/ab.%2eEfF3bBcC5;?#:@!*~ \\\x00\x7f\u00e9") + ["%2e", "%2F", "//",
                                                                                "..", "%61", "%3B"])
_TARGETS = st.one_of(
    st.lists(_ALPHABET, max_size=24).map(lambda xs: "/" + "".join(xs)),
    st.lists(_ALPHABET, max_size=24).map("".join),
    st.text(max_size=40),
)


@settings(max_examples=600)
@given(_TARGETS)
@example("/a/%2e%2E/b")
@example("//%2541")
def test_only_bad_request_and_idempotent(raw: str) -> None:
    try:
        t = canonicalize_target(raw)
    except BadRequest as exc:
        assert exc.code in ("invalid_target", "invalid_path")
        return
    assert t.path.startswith("/")
    assert canonicalize_target(t.request_target) == t
    assert canonicalize_path(t.path) == t.path
    # The canonical form contains nothing the rule refuses, and no dot segment or empty segment.
    assert ";" not in t.path and "//" not in t.path
    assert all(seg not in (".", "..") for seg in t.path.split("/"))


@settings(max_examples=600)
@given(_TARGETS)
def test_fast_path_agrees_with_slow_path(raw: str) -> None:
    """The fast path is an optimisation only: whatever it accepts, the full rule maps to itself."""
    try:
        fast = canonicalize_target(raw)
    except BadRequest:
        fast = None
    try:
        slow = paths._canonicalize_target_slow(raw)
    except BadRequest:
        slow = None
    assert fast == slow
