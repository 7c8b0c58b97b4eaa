"""SPIFFE ID parsing (SPIFFE-ID.md sections 2, 2.1, 2.2, 2.3): one case per rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.model import SpiffeId
from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain
from proxy.errors import InvalidValue

LONGEST_TD = "a" * 255
LONGEST_ID = "spiffe://td/" + "p" * (2048 - len("spiffe://td/"))


@pytest.mark.parametrize(
    ("value", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/web", "example.org", "/web"),
        ("spiffe://k8s-west.example.com/ns/staging/sa/default", "k8s-west.example.com",
         "/ns/staging/sa/default"),
        ("spiffe://td_1.x-y/Mixed.Case-path_9", "td_1.x-y", "/Mixed.Case-path_9"),
        ("spiffe://example.org/a/.hidden/..dots", "example.org", "/a/.hidden/..dots"),
        ("spiffe://123", "123", ""),
        ("spiffe://" + LONGEST_TD + "/x", LONGEST_TD, "/x"),
        (LONGEST_ID, "td", LONGEST_ID[len("spiffe://td"):]),
    ],
)
def test_valid_ids_parse_and_round_trip(value: str, trust_domain: str, path: str) -> None:
    parsed = parse_spiffe_id(value)
    assert parsed == SpiffeId(trust_domain, path)
    assert str(parsed) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        # section 2: the spiffe scheme, in lowercase
        ("SPIFFE://example.org/web", "must start with spiffe://"),
        ("Spiffe://example.org/web", "must start with spiffe://"),
        ("https://example.org/web", "must start with spiffe://"),
        ("spiffe:/example.org/web", "must start with spiffe://"),
        ("example.org/web", "must start with spiffe://"),
        ("", "must start with spiffe://"),
        # section 2: a non-empty trust domain
        ("spiffe://", "no trust domain"),
        ("spiffe:///web", "no trust domain"),
        # section 2.1: trust domain characters (lowercase letters, digits, . - _)
        ("spiffe://Example.org/web", "trust domain has characters"),
        ("spiffe://EXAMPLE.ORG", "trust domain has characters"),
        ("spiffe://exa mple.org/web", "trust domain has characters"),
        ("spiffe://exämple.org/web", "trust domain has characters"),
        ("spiffe://example.org+x/web", "trust domain has characters"),
        # section 2.1: no userinfo, no port
        ("spiffe://user@example.org/web", "userinfo"),
        ("spiffe://user:pw@example.org/web", "userinfo"),
        ("spiffe://example.org:8443/web", "port"),
        ("spiffe://example.org:/web", "port"),
        # section 2: no query, no fragment
        ("spiffe://example.org/web?x=1", "query"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/web#frag", "fragment"),
        # section 2.2: no percent-encoding
        ("spiffe://example.org/we%62", "percent-encoding"),
        ("spiffe://example.org/a%2Fb", "percent-encoding"),
        # section 2.2: no empty, "." or ".." segments, no trailing slash
        ("spiffe://example.org/", "empty segment or a trailing slash"),
        ("spiffe://example.org/web/", "empty segment or a trailing slash"),
        ("spiffe://example.org//web", "empty segment or a trailing slash"),
        ("spiffe://example.org/a//b", "empty segment or a trailing slash"),
        ("spiffe://example.org/.", "dot segment"),
        ("spiffe://example.org/a/../b", "dot segment"),
        ("spiffe://example.org/a/./b", "dot segment"),
        # section 2.2: path characters
        ("spiffe://example.org/we b", "path has characters"),
        ("spiffe://example.org/wéb", "path has characters"),
        ("spiffe://example.org/a:b", "path has characters"),
        ("spiffe://example.org/a\\b", "path has characters"),
        ("spiffe://example.org/a~b", "path has characters"),
        # section 2.3: lengths
        ("spiffe://" + "a" * 256 + "/x", "longer than 255"),
        (LONGEST_ID + "p", "longer than 2048 bytes"),
    ],
)
def test_invalid_ids_are_refused_with_the_rule_they_break(value: str, reason: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_spiffe_id(value)
    assert reason in info.value.reason


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidValue):
        parse_spiffe_id(b"spiffe://example.org/web")  # type: ignore[arg-type]


def test_length_limit_counts_utf8_bytes_not_characters() -> None:
    value = "spiffe://td/" + "é" * 1100  # 1112 characters, over 2048 bytes
    with pytest.raises(InvalidValue, match="2048 bytes"):
        parse_spiffe_id(value)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("example.org", True), ("a", True), ("a" * 255, True), ("a-b_c.9", True),
     ("", False), ("a" * 256, False), ("Example.org", False), ("ex ample", False),
     ("example.org:80", False), ("ex/ample", False)],
)
def test_parse_trust_domain(name: str, ok: bool) -> None:
    if ok:
        assert parse_trust_domain(name) == name
    else:
        with pytest.raises(InvalidValue):
            parse_trust_domain(name)


_URIISH = st.lists(st.sampled_from(list("abcXYZ09.-_/:@?#%~ é") + ["spiffe://", "//"]),
                   max_size=30).map("".join)


@settings(max_examples=500)
@given(st.one_of(_URIISH, st.builds(lambda s: "spiffe://" + s, _URIISH), st.text(max_size=60)))
def test_parse_raises_only_invalid_value_and_round_trips(value: str) -> None:
    try:
        parsed = parse_spiffe_id(value)
    except InvalidValue:
        return
    assert str(parsed) == value
    assert parse_spiffe_id(str(parsed)) == parsed
