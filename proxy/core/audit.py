"""Tamper-evident audit log: canonical form, per-writer hash chain, signed checkpoints, verifier.

Implements DESIGN.md section 6 and RFC 8785 (JSON Canonicalization Scheme, JCS) for the value domain
audit records use:
- Input domain (RFC 8785 section 3.1, I-JSON / RFC 7493): objects with str keys, arrays (list or
  tuple), str, bool, None and integers in the IEEE-754 safe range -(2**53-1)..2**53-1. Floats
  (including NaN and infinities), other types, non-str keys, lone surrogates and nesting deeper than
  `MAX_DEPTH` raise `ValueError`: durations are integer microseconds.
- Serialisation (sections 3.2.1, 3.2.2, 3.2.4): no whitespace; literals `true`/`false`/`null`;
  strings escape only `"` `\\` and U+0000..U+001F (`\\b \\t \\n \\f \\r`, else lowercase `\\u00xx`);
  integers in plain decimal; UTF-8 output.
- Property order (section 3.2.3): by UTF-16 code units. For ASCII keys this equals the order orjson's
  OPT_SORT_KEYS produces, which is the fast path; a record with any non-ASCII key is serialised by a
  small recursive encoder that sorts by UTF-16 code units.

Chain rules (one `AuditChain` per writer process, one owner, not thread-safe):
- Every line carries `chain` (writer id), `seq` (1, 2, 3... per chain, checkpoints included),
  `prev_hash` (the previous line's `hash`; `GENESIS_HASH` for seq 1) and `hash` = hex SHA-256 over the
  canonical form of the line WITHOUT `hash`. A line is written as those canonical bytes with
  `,"hash":"..."` spliced before the final `}`: one serialisation per record. The verifier rebuilds
  exactly these bytes, so duplicate keys or a re-serialised line are reported too.
- A checkpoint (`type: "checkpoint"`) is a line of the same chain that covers every earlier line
  (`records` = its own seq - 1) and, with a signing key, carries `key_id` (first 16 hex of SHA-256
  of the raw Ed25519 public key) and `sig` (unpadded base64url Ed25519 signature, RFC 8032, over the
  canonical checkpoint without `sig` and `hash`). Because `prev_hash` links back to seq 1, a valid
  signature vouches for the whole chain before it. The last line of a chain is a `final` checkpoint;
  nothing may follow it.
- Verification (`verify_lines`) checks each chain on its own, reports every problem as
  (line_no, chain, seq, reason), and names the first broken line of each chain. Without a public key
  signatures are not checked and the report says so (integrity of the chain only).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import sha256
from typing import Any, Iterable, Mapping, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

GENESIS_HASH = "0" * 64
CHECKPOINT = "checkpoint"
MAX_DEPTH = 32
#: Fields the chain owns; a record handed to `seal` must not set them.
INTEGRITY_FIELDS = frozenset({"chain", "seq", "prev_hash", "hash"})

_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_SCALARS = frozenset({str, int, bool, type(None)})
_HEX = frozenset("0123456789abcdef")


# --------------------------------------------------------------------------------------------
# Canonical form (RFC 8785)
# --------------------------------------------------------------------------------------------


def _scan(obj: dict, depth: int) -> bool:
    """Reject what JCS/I-JSON does not admit; return True when some key is not ASCII."""
    if depth > MAX_DEPTH:
        raise ValueError(f"audit record nests deeper than {MAX_DEPTH} levels")
    non_ascii = False
    for k, v in obj.items():
        if type(k) is not str:
            raise ValueError(f"audit record key {k!r} is not a string")
        if not k.isascii():
            non_ascii = True
        t = type(v)
        if t in _SCALARS:
            continue
        if t is dict:
            non_ascii = _scan(v, depth + 1) or non_ascii
        elif t is list or t is tuple:
            non_ascii = _scan_list(v, depth + 1) or non_ascii
        else:
            _check_other(k, v)
    return non_ascii


def _scan_list(items: list | tuple, depth: int) -> bool:
    if depth > MAX_DEPTH:
        raise ValueError(f"audit record nests deeper than {MAX_DEPTH} levels")
    non_ascii = False
    for i, v in enumerate(items):
        t = type(v)
        if t in _SCALARS:
            continue
        if t is dict:
            non_ascii = _scan(v, depth + 1) or non_ascii
        elif t is list or t is tuple:
            non_ascii = _scan_list(v, depth + 1) or non_ascii
        else:
            _check_other(f"[{i}]", v)
    return non_ascii


def _check_other(where: object, v: object) -> None:
    if isinstance(v, float):
        raise ValueError(f"audit field {where!r}: floats are not allowed (use integers)")
    if isinstance(v, (str, int)):  # str/int subclasses (StrEnum, IntEnum) serialise as their value
        return
    raise ValueError(f"audit field {where!r}: {type(v).__name__} is not a JSON value")


def _utf16_key(item: tuple[str, Any]) -> bytes:
    return item[0].encode("utf-16-be", "surrogatepass")


def _jcs(v: Any) -> bytes:
    """Recursive encoder for records with non-ASCII keys (RFC 8785 section 3.2.3 ordering)."""
    if type(v) is dict:
        parts = [orjson.dumps(k) + b":" + _jcs(x) for k, x in sorted(v.items(), key=_utf16_key)]
        return b"{" + b",".join(parts) + b"}"
    if type(v) is list or type(v) is tuple:
        return b"[" + b",".join(_jcs(x) for x in v) + b"]"
    return orjson.dumps(v, option=orjson.OPT_STRICT_INTEGER)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of `record`; `ValueError` if it is outside the domain."""
    obj = record if type(record) is dict else dict(record)
    try:
        if _scan(obj, 0):
            return _jcs(obj)
        return orjson.dumps(obj, option=_OPTS)
    except orjson.JSONEncodeError as exc:  # integer beyond 2**53-1, lone surrogate
        raise ValueError(f"audit record is not canonicalisable: {exc}") from None
    except UnicodeEncodeError as exc:  # lone surrogate in a key on the slow path
        raise ValueError(f"audit record is not canonicalisable: {exc.reason}") from None


def _seal_bytes(body: dict) -> tuple[bytes, str]:
    """The written line (canonical body with the hash spliced in) and the hash."""
    c = canonical(body)
    h = sha256(c).hexdigest()
    return b"".join((c[:-1], b',"hash":"', h.encode("ascii"), b'"}\n')), h


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def params_digest(params: Mapping[str, Any]) -> str:
    """Hex SHA-256 of an action's parameters in canonical form (Decimal values as their exact
    decimal string): audit records name the parameters an action was decided on without
    copying values that may be personal or secret."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict) or isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, (str, bool)) or v is None or (isinstance(v, int) and abs(v) < 2 ** 53):
            return v
        return str(v)  # Decimal, big ints, anything exotic: exact text
    return sha256(canonical(plain(dict(params)))).hexdigest()


def format_time(now: float) -> str:
    """RFC 3339 UTC with milliseconds, as audit records use: `2026-11-28T14:00:00.123Z`."""
    ms = round(now * 1_000_000) // 1000  # whole microseconds first: 0.123 must not print .122
    secs, milli = divmod(ms, 1000)
    dt = datetime.fromtimestamp(secs, tz=timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{milli:03d}Z"


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 over the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return sha256(raw).hexdigest()[:16]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not text or "=" in text or not text.isascii():
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not unpadded base64url") from None


# --------------------------------------------------------------------------------------------
# Writer side
# --------------------------------------------------------------------------------------------


class AuditChain:
    """The per-writer chain state machine. One owner; not thread-safe.

    `seq` is the seq of the last line sealed (0 before any), `head` its hash, `since_checkpoint`
    the number of records sealed since the last checkpoint, `closed` True after a final checkpoint.
    """

    __slots__ = ("chain_id", "seq", "head", "since_checkpoint", "checkpoints", "closed",
                 "key_id", "_signer")

    def __init__(self, chain_id: str, *, signer: Ed25519PrivateKey | None = None) -> None:
        if type(chain_id) is not str or not chain_id:
            raise ValueError("chain id must be a non-empty string")
        self.chain_id = chain_id
        self.seq = 0
        self.head = GENESIS_HASH
        self.since_checkpoint = 0
        self.checkpoints = 0
        self.closed = False
        self._signer = signer
        self.key_id = key_id(signer.public_key()) if signer is not None else None

    def seal(self, record: dict) -> bytes:
        """Add chain/seq/prev_hash/hash to a copy of `record`; return its line (ends with b"\\n").

        Raises ValueError when the record has no string `type`, claims to be a checkpoint, sets an
        integrity field itself, or holds a value outside the canonical domain; the chain does not
        advance then. Raises RuntimeError after the final checkpoint.
        """
        if self.closed:
            raise RuntimeError(f"audit chain {self.chain_id!r} is closed by its final checkpoint")
        kind = record.get("type")
        if type(kind) is not str or not kind:
            raise ValueError("audit record needs a string 'type'")
        if kind == CHECKPOINT:
            raise ValueError("checkpoints are made by AuditChain.checkpoint(), not sealed")
        if not INTEGRITY_FIELDS.isdisjoint(record):
            raise ValueError(f"audit record must not set {sorted(INTEGRITY_FIELDS & record.keys())}")
        body = dict(record)
        seq = self.seq + 1
        body["chain"] = self.chain_id
        body["seq"] = seq
        body["prev_hash"] = self.head
        line, h = _seal_bytes(body)
        self.seq, self.head = seq, h
        self.since_checkpoint += 1
        return line

    def seal_owned(self, record: dict) -> bytes:
        """The hot-path `seal` for records the runtime builds itself: the dict is taken over (not
        copied; integrity fields are added to it) and not re-scanned, because its builder only
        ever uses ASCII keys and str/int/bool/None/list/dict values. The verifier re-canonicalises
        every line, so a value outside the domain would still be reported, never hidden."""
        if self.closed:
            raise RuntimeError(f"audit chain {self.chain_id!r} is closed by its final checkpoint")
        seq = self.seq + 1
        record["chain"] = self.chain_id
        record["seq"] = seq
        record["prev_hash"] = self.head
        try:
            c = orjson.dumps(record, option=_OPTS)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"audit record is not canonicalisable: {exc}") from None
        h = sha256(c).hexdigest()
        self.seq, self.head = seq, h
        self.since_checkpoint += 1
        return b"".join((c[:-1], b',"hash":"', h.encode("ascii"), b'"}\n'))

    def checkpoint(self, time: str, *, final: bool = False) -> bytes:
        """Seal a checkpoint covering every line so far; signed when the chain has a signer."""
        if self.closed:
            raise RuntimeError(f"audit chain {self.chain_id!r} is closed by its final checkpoint")
        if type(time) is not str:
            raise ValueError("checkpoint time must be a string (see format_time)")
        seq = self.seq + 1
        cp: dict[str, Any] = {
            "type": CHECKPOINT, "time": time, "chain": self.chain_id, "seq": seq,
            "prev_hash": self.head, "records": self.seq, "final": bool(final),
        }
        if self._signer is not None:
            cp["key_id"] = self.key_id
            cp["sig"] = _b64url(self._signer.sign(canonical(cp)))
        line, h = _seal_bytes(cp)
        self.seq, self.head = seq, h
        self.since_checkpoint = 0
        self.checkpoints += 1
        self.closed = bool(final)
        return line


# --------------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    """One broken line. `chain`/`seq` are None when the line did not say (e.g. not JSON)."""

    line_no: int
    chain: str | None
    seq: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What the verifier saw of one chain.

    `last_signed_seq`: seq of the last checkpoint that verified (its signature when keys were given;
    its structure and hash otherwise), 0 if none. `unsealed`: records after that checkpoint.
    `final`: the chain ends in a verified final checkpoint. `first_broken`: its first problem.
    """

    chain: str
    records: int
    checkpoints: int
    first_seq: int
    last_seq: int
    last_signed_seq: int
    final: bool
    unsealed: int
    first_broken: Problem | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    signatures_checked: bool
    lines: int
    chains: dict[str, ChainReport]
    problems: list[Problem] = field(default_factory=list)


@dataclass(slots=True)
class _ChainState:
    first_seq: int
    expect: int = 1
    head: str = GENESIS_HASH
    last_seq: int = 0
    last_line: int = 0
    records: int = 0
    checkpoints: int = 0
    last_good_cp: int = 0
    since_good_cp: int = 0
    final: bool = False


def _is_hash(v: object) -> bool:
    return type(v) is str and len(v) == 64 and _HEX.issuperset(v)


def _keys_by_id(
    public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None,
) -> dict[str, Ed25519PublicKey] | None:
    if public_key is None:
        return None
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    return {key_id(k): k for k in keys}


def _check_signature(cp: dict, keys: dict[str, Ed25519PublicKey]) -> str | None:
    """None when the checkpoint is signed by one of `keys`, else why not."""
    kid, sig = cp.get("key_id"), cp.get("sig")
    if sig is None and kid is None:
        return "checkpoint is not signed"
    if type(kid) is not str or type(sig) is not str:
        return "checkpoint key_id/sig are malformed"
    key = keys.get(kid)
    if key is None:
        return f"checkpoint is signed by another key (key_id {kid}, expected {' or '.join(keys)})"
    try:
        raw = _b64url_decode(sig)
    except ValueError:
        return "checkpoint sig is not unpadded base64url"
    unsigned = {k: v for k, v in cp.items() if k != "sig"}
    try:
        key.verify(raw, canonical(unsigned))
    except InvalidSignature:
        return "checkpoint signature is invalid"
    return None


def verify_lines(
    lines: Iterable[bytes],
    public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None,
    *,
    exact_bytes: bool = True,
) -> VerifyReport:
    """Verify every chain found in `lines` (interleaved chains are separated by their `chain`).

    `public_key` may be one key or several (rotation); None skips signature checks. With
    `exact_bytes` a line whose content hashes correctly but whose bytes differ from the writer's
    encoding (duplicate keys, re-serialisation) is a problem too.
    """
    keys = _keys_by_id(public_key)
    states: dict[str, _ChainState] = {}
    problems: list[Problem] = []
    line_no = 0
    for line_no, line in enumerate(lines, start=1):
        if type(line) is str:
            line = line.encode("utf-8", "surrogatepass")
        raw = line[:-1] if line.endswith(b"\n") else line
        if not raw.strip():
            continue
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problems.append(Problem(line_no, None, None, "line is not JSON"))
            continue
        if type(d) is not dict:
            problems.append(Problem(line_no, None, None, "line is not a JSON object"))
            continue
        chain, seq, prev, h = d.get("chain"), d.get("seq"), d.get("prev_hash"), d.get("hash")
        if type(chain) is not str or not chain:
            problems.append(Problem(line_no, None, None, "record has no chain id"))
            continue
        if type(seq) is not int or seq < 1:
            problems.append(Problem(line_no, chain, None, "record has no valid seq"))
            continue
        if not _is_hash(prev) or not _is_hash(h):
            problems.append(Problem(line_no, chain, seq, "record has no valid prev_hash/hash"))
            continue

        def report(reason: str) -> None:
            problems.append(Problem(line_no, chain, seq, reason))

        # 1. the line's own content
        body = {k: v for k, v in d.items() if k != "hash"}
        content_ok = False
        try:
            c = canonical(body)
        except ValueError as exc:
            report(f"record is not canonical JSON ({exc})")
        else:
            if sha256(c).hexdigest() != h:
                report("hash mismatch: the record was edited")
            elif exact_bytes and raw != b"".join((c[:-1], b',"hash":"', h.encode(), b'"}')):
                report("bytes differ from the writer's encoding (duplicate keys or re-serialised)")
            else:
                content_ok = True

        # 2. its place in the chain
        st = states.get(chain)
        forward = True
        if st is None:
            st = states[chain] = _ChainState(first_seq=seq)
            if seq != 1:
                report(f"chain starts at seq {seq}, not 1 (its beginning is missing)")
            elif prev != GENESIS_HASH:
                report("seq 1 does not link to the genesis hash")
        elif st.final:
            report("record after the chain's final checkpoint")
            forward = seq >= st.expect
        elif seq == st.expect:
            if prev != st.head:
                report("prev_hash does not match the previous record "
                       "(a record was inserted, deleted or replaced)")
        elif seq > st.expect:
            missing = seq - st.expect
            report(f"seq jumps from {st.expect - 1} to {seq}: {missing} record(s) missing "
                   "(deleted or reordered)")
        else:
            forward = False
            report(f"seq {seq} after seq {st.last_seq} (line {st.last_line}): "
                   "record inserted, duplicated or reordered")
        if forward:
            st.expect, st.head, st.last_seq, st.last_line = seq + 1, h, seq, line_no

        # 3. checkpoints seal what came before them
        if d.get("type") != CHECKPOINT:
            st.records += 1
            st.since_good_cp += 1
            continue
        st.checkpoints += 1
        good = content_ok
        if d.get("records") != seq - 1 or type(d.get("final")) is not bool:
            report("checkpoint fields are malformed (records must be seq - 1, final a boolean)")
            good = False
        if keys is not None:
            why = _check_signature(body, keys)
            if why is not None:
                first, last = st.last_good_cp + 1, seq - 1
                span = f"seq {first}..{last}" if last >= first else "none"
                report(f"{why}: the {st.since_good_cp} record(s) since the last good checkpoint "
                       f"({span}) are untrusted")
                good = False
        if good:
            st.last_good_cp = seq
            st.since_good_cp = 0
            st.final = st.final or d["final"]

    what = "signed " if keys is not None else ""
    for chain, st in states.items():
        if not st.final:
            where = (f"after the last {what}checkpoint (seq {st.last_good_cp})" if st.last_good_cp
                     else f"and no {what}checkpoint verified")
            problems.append(Problem(
                st.last_line, chain, st.last_seq,
                f"chain does not end in a final checkpoint: {st.since_good_cp} record(s) {where} "
                "are unsealed (truncated, or the writer stopped without closing)"))

    first: dict[str, Problem] = {}
    for p in problems:
        if p.chain is not None and p.chain in states:
            first.setdefault(p.chain, p)
    chains = {
        name: ChainReport(chain=name, records=st.records, checkpoints=st.checkpoints,
                          first_seq=st.first_seq, last_seq=st.last_seq,
                          last_signed_seq=st.last_good_cp, final=st.final,
                          unsealed=st.since_good_cp, first_broken=first.get(name))
        for name, st in states.items()
    }
    return VerifyReport(ok=not problems, signatures_checked=keys is not None, lines=line_no,
                        chains=chains, problems=problems)


def format_report(report: VerifyReport) -> str:
    """Human-readable report: a summary line, then one line per problem in file order."""
    records = sum(c.records for c in report.chains.values())
    cps = sum(c.checkpoints for c in report.chains.values())
    sigs = "signatures checked" if report.signatures_checked else \
        "signatures NOT checked (no public key): chain integrity only"
    counts = (f"{len(report.chains)} chain(s), {records} record(s), {cps} checkpoint(s), "
              f"{report.lines} line(s); {sigs}")
    if report.ok:
        out = [f"audit verify: OK: {counts}"]
    else:
        broken = sum(1 for c in report.chains.values() if c.first_broken is not None)
        out = [f"audit verify: FAILED: {len(report.problems)} problem(s), {broken} broken "
               f"chain(s); {counts}"]
    firsts = {id(c.first_broken) for c in report.chains.values() if c.first_broken is not None}
    for p in report.problems:
        where = f"line {p.line_no}"
        if p.chain is not None:
            where += f" chain {p.chain}"
        if p.seq is not None:
            where += f" seq {p.seq}"
        mark = " [first broken]" if id(p) in firsts else ""
        out.append(f"{where}{mark}: {p.reason}")
    return "\n".join(out)
