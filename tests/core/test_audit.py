"""proxy.core.audit: RFC 8785 canonical form, the hash chain, checkpoints and the verifier."""

from __future__ import annotations

import base64
import json
import math
from hashlib import sha256
from types import MappingProxyType

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.audit import (
    GENESIS_HASH,
    AuditChain,
    canonical,
    format_report,
    format_time,
    key_id,
    verify_lines,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = KEY.public_key()


def decision(i: int, **extra) -> dict:
    return {"type": "decision", "time": "2026-11-28T14:00:00.123Z", "decision_id": f"d{i}",
            "request_id": f"r{i}", "workload": {"spiffe_id": "spiffe://example.org/a",
                                                 "cert_sha256": "ab" * 32},
            "method": "GET", "path": f"/items/{i}", "decision": "allow", "code": "allowed",
            "rule_id": "r1", "policy_revision": 7, "mode": "enforce", "upstream_status": 200,
            "duration_us": 812, **extra}


def make_log(n: int, *, chain: str = "w1", key=KEY, every: int = 5, final: bool = True) -> list[bytes]:
    """n decision records with a checkpoint after every `every` records, then a final checkpoint."""
    c = AuditChain(chain, signer=key)
    out = []
    for i in range(1, n + 1):
        out.append(c.seal(decision(i)))
        if i % every == 0:
            out.append(c.checkpoint("2026-11-28T14:00:01.000Z"))
    if final:
        out.append(c.checkpoint("2026-11-28T14:00:02.000Z", final=True))
    return out


def splice(body: dict) -> tuple[bytes, str]:
    """What an attacker without the key can do: recompute a line's hash exactly like the writer."""
    c = canonical({k: v for k, v in body.items() if k != "hash"})
    h = sha256(c).hexdigest()
    return c[:-1] + b',"hash":"' + h.encode() + b'"}\n', h


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """Recompute prev_hash/hash of every line from index `start` on (signatures are kept as they are)."""
    out = list(lines[:start])
    head = orjson.loads(out[-1])["hash"] if out else GENESIS_HASH
    for line in lines[start:]:
        d = orjson.loads(line)
        d["prev_hash"] = head
        new, head = splice(d)
        out.append(new)
    return out


def edit(line: bytes, **changes) -> bytes:
    d = orjson.loads(line)
    d.update(changes)
    return orjson.dumps(d) + b"\n"


def problems(lines, key=PUB, **kw):
    report = verify_lines(lines, key, **kw)
    return report, [(p.line_no, p.chain, p.seq) for p in report.problems]


# --------------------------------------------------------------------------------------------
# canonical form (RFC 8785)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ({"b": 1, "a": {"d": [1, "x", None, True], "c": False}},
     b'{"a":{"c":false,"d":[1,"x",null,true]},"b":1}'),
    ({"s": "\u0000\b\t\n\f\r\"\\/\x1f\x7f\u20ac\U0001f600"},
     '{"s":"\\u0000\\b\\t\\n\\f\\r\\"\\\\/\\u001f\x7f\u20ac\U0001f600"}'.encode()),
    ({"max": 2**53 - 1, "min": -(2**53 - 1), "zero": 0}, b'{"max":9007199254740991,'
     b'"min":-9007199254740991,"zero":0}'),
    ({"t": (1, 2), "e": {}, "l": []}, b'{"e":{},"l":[],"t":[1,2]}'),
    # RFC 8785 section 3.2.3: property names sorted by UTF-16 code units, not code points
    ({"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"},
     '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin Small Letter O With '
     'Diaeresis","\u20ac":"Euro Sign","\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter '
     'Dalet With Dagesh"}'.encode()),
    ({"n": {"\ue000": 1, "\U00010000": 2}}, '{"n":{"\U00010000":2,"\ue000":1}}'.encode()),
])
def test_canonical_form(value, expected):
    assert canonical(value) == expected


def test_canonical_accepts_any_mapping():
    assert canonical(MappingProxyType({"b": 1, "a": 2})) == b'{"a":2,"b":1}'


def _deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"x": d}
    return d


@pytest.mark.parametrize("value", [
    {"f": 1.0},                       # floats: durations are integer microseconds
    {"f": math.nan},
    {"f": math.inf},
    {"l": [1, 2, 0.5]},
    {"d": {"inner": -0.0}},
    {1: "non-str key"},
    {"big": 2**53},                   # outside the I-JSON safe integer range
    {"small": -(2**53)},
    {"s": "\ud800"},                  # lone surrogate: not well-formed Unicode
    {"\udc00\u00e9": 1},
    {"b": b"bytes"},
    {"set": {1, 2}},
    {"obj": object()},
    _deep(40),
])
def test_canonical_rejects_values_outside_the_domain(value):
    with pytest.raises(ValueError):
        canonical(value)


def _oracle(v):
    """Independent JCS model: insert keys in UTF-16 order, let json.dumps keep that order."""
    if isinstance(v, dict):
        return {k: _oracle(v[k]) for k in sorted(v, key=lambda k: k.encode("utf-16-be"))}
    if isinstance(v, list):
        return [_oracle(x) for x in v]
    return v


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _json, max_size=6))
def test_canonical_matches_an_independent_model(value):
    expected = json.dumps(_oracle(value), separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical(value) == expected
    assert canonical(orjson.loads(expected)) == expected


@pytest.mark.parametrize("now, expected", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1764338400.123, "2025-11-28T14:00:00.123Z"),
    (1764338400.9999, "2025-11-28T14:00:00.999Z"),
])
def test_format_time(now, expected):
    assert format_time(now) == expected


# --------------------------------------------------------------------------------------------
# the writer's chain
# --------------------------------------------------------------------------------------------


def test_seal_links_records_and_hashes_the_canonical_form():
    c = AuditChain("w1")
    rec = decision(1)
    before = dict(rec)
    l1, l2 = c.seal(rec), c.seal(decision(2))
    assert rec == before  # the caller's dict is not touched
    assert l1.endswith(b"\n") and l1.count(b"\n") == 1
    d1, d2 = orjson.loads(l1), orjson.loads(l2)
    assert (d1["chain"], d1["seq"], d1["prev_hash"]) == ("w1", 1, GENESIS_HASH)
    assert (d2["seq"], d2["prev_hash"]) == (2, d1["hash"])
    body = {k: v for k, v in d1.items() if k != "hash"}
    assert d1["hash"] == sha256(canonical(body)).hexdigest()
    assert l1 == canonical(body)[:-1] + b',"hash":"' + d1["hash"].encode() + b'"}\n'
    assert (c.seq, c.head, c.since_checkpoint) == (2, d2["hash"], 2)


@pytest.mark.parametrize("record", [
    {"decision": "allow"},                          # no type
    {"type": ""},
    {"type": 3},
    {"type": "checkpoint"},                         # checkpoints cannot be forged through seal
    {"type": "decision", "chain": "x"},             # integrity fields belong to the chain
    {"type": "decision", "seq": 9},
    {"type": "decision", "prev_hash": GENESIS_HASH},
    {"type": "decision", "hash": GENESIS_HASH},
    {"type": "decision", "duration_s": 0.5},        # floats
])
def test_seal_rejects_bad_records_without_advancing(record):
    c = AuditChain("w1")
    c.seal(decision(1))
    state = (c.seq, c.head, c.since_checkpoint)
    with pytest.raises(ValueError):
        c.seal(record)
    assert (c.seq, c.head, c.since_checkpoint) == state


@pytest.mark.parametrize("chain_id", ["", None, 7])
def test_chain_id_must_be_a_non_empty_string(chain_id):
    with pytest.raises(ValueError):
        AuditChain(chain_id)


def test_signed_checkpoint_covers_the_chain():
    c = AuditChain("w1", signer=KEY)
    c.seal(decision(1))
    c.seal(decision(2))
    cp = orjson.loads(c.checkpoint("2026-11-28T14:00:01.000Z"))
    raw = PUB.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert cp["key_id"] == key_id(PUB) == sha256(raw).hexdigest()[:16]
    assert (cp["type"], cp["seq"], cp["records"], cp["final"]) == ("checkpoint", 3, 2, False)
    unsigned = {k: v for k, v in cp.items() if k not in ("sig", "hash")}
    assert "=" not in cp["sig"]
    PUB.verify(base64.urlsafe_b64decode(cp["sig"] + "=="), canonical(unsigned))  # raises if bad
    assert c.since_checkpoint == 0


def test_unsigned_checkpoint_has_no_sig():
    c = AuditChain("w1")
    c.seal(decision(1))
    cp = orjson.loads(c.checkpoint("t"))
    assert "sig" not in cp and "key_id" not in cp


def test_nothing_follows_the_final_checkpoint():
    c = AuditChain("w1")
    c.checkpoint("t", final=True)
    with pytest.raises(RuntimeError):
        c.seal(decision(1))
    with pytest.raises(RuntimeError):
        c.checkpoint("t")


def test_checkpoint_time_must_be_a_string():
    with pytest.raises(ValueError):
        AuditChain("w1").checkpoint(1764338400.0)


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def test_intact_signed_log_verifies():
    lines = make_log(12)  # records 1..12, checkpoints after 5 and 10, final
    report = verify_lines(lines, PUB)
    assert report.ok and report.signatures_checked and report.problems == []
    ch = report.chains["w1"]
    assert (ch.records, ch.checkpoints, ch.first_seq, ch.last_seq) == (12, 3, 1, 15)
    assert (ch.last_signed_seq, ch.final, ch.unsealed, ch.first_broken) == (15, True, 0, None)
    assert format_report(report).startswith("audit verify: OK")


def test_without_a_key_signatures_are_not_checked_and_the_report_says_so():
    report = verify_lines(make_log(6), None)
    assert report.ok and not report.signatures_checked
    assert "NOT checked" in format_report(report).splitlines()[0]


def test_without_a_key_a_recomputed_chain_passes_chain_integrity_only():
    lines = make_log(12)
    lines[2] = edit(lines[2], decision="deny")
    report = verify_lines(rechain(lines, 2), None)
    assert report.ok and not report.signatures_checked  # only a key can catch this forgery


def test_edited_field_is_a_hash_mismatch():
    lines = make_log(12)
    lines[3] = edit(lines[3], decision="deny")  # record seq 4, hash left as it was
    report, where = problems(lines)
    assert where == [(4, "w1", 4)]
    assert "edited" in report.problems[0].reason
    assert report.chains["w1"].first_broken == report.problems[0]


def test_edit_with_every_later_hash_recomputed_is_caught_by_the_next_checkpoint():
    lines = make_log(12)  # line 6 = checkpoint seq 6 (after records 1-5), line 12 = checkpoint seq 12
    lines[7] = edit(lines[7], decision="deny")  # record seq 8, after the good checkpoint at seq 6
    report, where = problems(rechain(lines, 7))
    first = report.problems[0]
    assert (first.line_no, first.chain, first.seq) == (12, "w1", 12)
    assert "signature is invalid" in first.reason
    assert "5 record(s) since the last good checkpoint (seq 7..11) are untrusted" in first.reason
    assert report.chains["w1"].last_signed_seq == 6
    assert not report.chains["w1"].final


def test_deleted_record_is_a_seq_gap():
    lines = make_log(12)
    del lines[2]  # record seq 3
    report, where = problems(lines)
    assert where[0] == (3, "w1", 4)
    assert "1 record(s) missing" in report.problems[0].reason


def test_inserted_forged_record_is_detected():
    lines = make_log(12)
    prev = orjson.loads(lines[1])  # seq 2
    forged, _ = splice({**decision(99), "chain": "w1", "seq": 3, "prev_hash": prev["hash"]})
    lines.insert(2, forged)
    report, where = problems(lines)
    assert where[0] == (4, "w1", 3)  # the genuine seq 3 now collides with the forged one
    assert "inserted" in report.problems[0].reason and "line 3" in report.problems[0].reason


def test_duplicated_record_is_detected():
    lines = make_log(12)
    lines.insert(5, lines[4])
    report, where = problems(lines)
    assert where[0] == (6, "w1", 5)


def test_swapped_records_are_detected():
    lines = make_log(12)
    lines[2], lines[3] = lines[3], lines[2]
    report, where = problems(lines)
    assert where[0] == (3, "w1", 4)
    assert report.chains["w1"].first_broken.line_no == 3


def test_truncation_after_a_checkpoint_reports_unsealed_records():
    lines = make_log(12)[:9]  # records 1-5, checkpoint seq 6, records seq 7-9
    report, where = problems(lines)
    assert where == [(9, "w1", 9)]
    assert "3 record(s) after the last signed checkpoint (seq 6) are unsealed" in \
        report.problems[0].reason
    assert (report.chains["w1"].unsealed, report.chains["w1"].final) == (3, False)


def test_truncation_at_a_checkpoint_is_still_not_final():
    report, where = problems(make_log(12)[:6])
    assert where == [(6, "w1", 6)] and report.chains["w1"].unsealed == 0


def test_chain_must_start_at_seq_1():
    report, where = problems(make_log(12)[2:])
    assert where == [(1, "w1", 3)]
    assert "starts at seq 3" in report.problems[0].reason


@pytest.mark.parametrize("garbage", [b"not json\n", b"{\"chain\": \n", b"[1,2]\n", b"\"x\"\n"])
def test_a_line_that_is_not_a_json_object(garbage):
    lines = make_log(4)
    lines.insert(2, garbage)
    report, where = problems(lines)
    assert where == [(3, None, None)]
    assert report.chains["w1"].first_broken is None  # the chain itself is intact


def test_checkpoint_signed_by_another_key():
    lines = make_log(6, key=OTHER_KEY)
    report, where = problems(lines)
    assert "signed by another key" in report.problems[0].reason
    assert where[0] == (6, "w1", 6)


def test_several_trusted_keys_accept_either_signer():
    lines = make_log(6, key=OTHER_KEY) + make_log(6, chain="w2")
    assert verify_lines(lines, [PUB, OTHER_KEY.public_key()]).ok


def test_unsigned_checkpoint_fails_when_a_key_is_given():
    report, where = problems(make_log(6, key=None))
    assert "not signed" in report.problems[0].reason


def test_interleaved_chains_are_verified_each_on_its_own():
    a, b, c = make_log(7, chain="w1"), make_log(9, chain="w2"), make_log(3, chain="w3")
    mixed = []
    for i in range(max(map(len, (a, b, c)))):
        mixed += [x[i] for x in (a, b, c) if i < len(x)]
    assert verify_lines(mixed, PUB).ok
    broken_at = mixed.index(b[4])
    mixed[broken_at] = edit(mixed[broken_at], code="tampered")
    report = verify_lines(mixed, PUB)
    assert not report.ok
    assert report.chains["w1"].first_broken is None and report.chains["w3"].first_broken is None
    assert report.chains["w2"].first_broken.line_no == broken_at + 1
    assert {ch.records for ch in report.chains.values()} == {7, 9, 3}


def test_record_after_the_final_checkpoint():
    lines = make_log(3)
    lines += make_log(2)  # the same chain id restarted
    report, where = problems(lines)
    assert "after the chain's final checkpoint" in report.problems[0].reason


def test_duplicate_keys_are_caught_by_the_exact_bytes_check():
    lines = make_log(3)
    lines[0] = lines[0].replace(b'{"chain"', b'{"decision":"deny","chain"', 1)  # first one wins elsewhere
    report, where = problems(lines)
    assert where == [(1, "w1", 1)] and "duplicate keys" in report.problems[0].reason


def test_reserialised_lines_pass_only_without_exact_bytes():
    lines = [json.dumps(orjson.loads(x), indent=None).encode() + b"\n" for x in make_log(3)]
    assert not verify_lines(lines, PUB).ok
    assert verify_lines(lines, PUB, exact_bytes=False).ok


def test_floats_in_a_line_are_not_canonical():
    lines = make_log(3)
    lines[1] = lines[1].replace(b'"duration_us":812', b'"duration_us":812.0')
    report, where = problems(lines)
    assert where == [(2, "w1", 2)] and "not canonical" in report.problems[0].reason


def test_blank_lines_are_ignored_and_str_lines_accepted():
    lines = [x.decode() for x in make_log(3)]
    lines.insert(1, "\n")
    assert verify_lines(lines, PUB).ok


def test_format_report_summary_then_one_line_per_problem():
    lines = make_log(12)
    lines[3] = edit(lines[3], decision="deny")
    lines = lines[:9]
    report = verify_lines(lines, PUB)
    text = format_report(report).splitlines()
    assert text[0].startswith("audit verify: FAILED: 2 problem(s), 1 broken chain(s)")
    assert len(text) == 1 + len(report.problems)
    assert text[1].startswith("line 4 chain w1 seq 4 [first broken]: hash mismatch")
    assert "[first broken]" not in text[2]


def test_seal_owned_writes_exactly_what_seal_writes_and_verifies():
    a, b = AuditChain("w-owned"), AuditChain("w-owned")
    recs = [{"type": "decision", "n": i, "who": "spiffe://example.org/é", "x": None,
             "nested": {"z": [1, "b", True]}} for i in range(3)]
    lines_a = [a.seal(dict(r)) for r in recs]
    lines_b = [b.seal_owned(dict(r)) for r in recs]
    assert lines_a == lines_b
    lines_b.append(b.checkpoint("2026-11-28T14:00:00.000Z", final=True))
    assert verify_lines(lines_b, None).ok


def test_seal_owned_refuses_values_outside_the_domain_without_advancing():
    ch = AuditChain("w-owned")
    with pytest.raises(ValueError):
        ch.seal_owned({"type": "decision", "big": 2 ** 60})
    assert ch.seq == 0
