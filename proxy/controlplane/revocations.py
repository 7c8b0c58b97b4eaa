"""Revocation lists carried in a bundle as `data/revocations.json` (pure: no I/O).

Format (one JSON object, every key optional in a change request, all four written out):

    {"spiffe_ids": ["spiffe://example.org/ns/demo/sa/batch", ...],
     "subjects":   [{"iss": "https://idp.example.org", "sub": "alice"}, ...],
     "clients":    ["client-id", ...],
     "jtis":       ["token-id", ...]}

Rules:
- `spiffe_ids` must be valid SPIFFE IDs (`core.spiffe.parse_spiffe_id`, exact: never normalised);
  `subjects` objects have exactly `iss` and `sub`, non-empty strings; `clients` and `jtis` are
  non-empty strings of at most `MAX_VALUE_CHARS` characters. Unknown keys are problems.
- A change request must name at least one entry. Every problem is reported with its path.
- The value type and the reader of the file inside a bundle are `proxy.core.bundle`'s
  (`Revocations`, `parse_revocations`): this module validates change requests (with a key path per
  problem), applies them and writes the file.
- The written form is canonical (sorted, de-duplicated, fixed key order) so that the same set of
  revocations always yields the same bytes, hence the same bundle digest.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.core.bundle import EMPTY_REVOCATIONS, REVOCATIONS_NAME, Revocations
from proxy.core.spiffe import parse_spiffe_id
from proxy.errors import InvalidValue, Problem

PATH = REVOCATIONS_NAME
KEYS = ("spiffe_ids", "subjects", "clients", "jtis")
MAX_VALUE_CHARS = 2048


def union(a: Revocations, b: Revocations) -> Revocations:
    return Revocations(a.spiffe_ids | b.spiffe_ids, a.subjects | b.subjects,
                       a.clients | b.clients, a.jtis | b.jtis)


def difference(a: Revocations, b: Revocations) -> Revocations:
    return Revocations(a.spiffe_ids - b.spiffe_ids, a.subjects - b.subjects,
                       a.clients - b.clients, a.jtis - b.jtis)


def count(r: Revocations) -> int:
    return len(r.spiffe_ids) + len(r.subjects) + len(r.clients) + len(r.jtis)


def to_json(r: Revocations) -> dict[str, Any]:
    return {
        "spiffe_ids": sorted(r.spiffe_ids),
        "subjects": [{"iss": i, "sub": s} for i, s in sorted(r.subjects)],
        "clients": sorted(r.clients),
        "jtis": sorted(r.jtis),
    }


def render(r: Revocations) -> bytes:
    """The canonical file contents."""
    return (json.dumps(to_json(r), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


EMPTY = EMPTY_REVOCATIONS


def _string(v: Any, path: str, problems: list[Problem]) -> str | None:
    if not isinstance(v, str) or not v:
        problems.append(Problem(path, f"must be a non-empty string; got {v!r}"[:200]))
        return None
    if len(v) > MAX_VALUE_CHARS:
        problems.append(Problem(path, f"longer than {MAX_VALUE_CHARS} characters"))
        return None
    return v


def parse(doc: Any, *, path: str = "", require_entry: bool = False,
          max_entries: int | None = None) -> tuple[Revocations, list[Problem]]:
    """Validate a parsed revocations document; returns the value and every problem found."""
    problems: list[Problem] = []
    if not isinstance(doc, dict):
        return EMPTY, [Problem(path, f"must be a JSON object; got {type(doc).__name__}")]

    def at(*keys: str | int) -> str:
        p = path
        for k in keys:
            p = f"{p}[{k}]" if isinstance(k, int) else (f"{p}.{k}" if p else k)
        return p

    for key in doc:
        if key not in KEYS:
            problems.append(Problem(at(str(key)), f"unknown key (known keys: {', '.join(KEYS)})"))
    lists: dict[str, list[Any]] = {}
    for key in KEYS:
        v = doc.get(key, [])
        if not isinstance(v, list):
            problems.append(Problem(at(key), f"must be a list; got {type(v).__name__}"))
            v = []
        lists[key] = v

    spiffe_ids: set[str] = set()
    for i, v in enumerate(lists["spiffe_ids"]):
        s = _string(v, at("spiffe_ids", i), problems)
        if s is None:
            continue
        try:
            parse_spiffe_id(s)
        except InvalidValue as exc:
            problems.append(Problem(at("spiffe_ids", i), f"not a SPIFFE ID: {exc.reason}"))
            continue
        spiffe_ids.add(s)

    subjects: set[tuple[str, str]] = set()
    for i, v in enumerate(lists["subjects"]):
        if not isinstance(v, dict):
            problems.append(Problem(at("subjects", i), "must be an object {iss, sub}"))
            continue
        for k in v:
            if k not in ("iss", "sub"):
                problems.append(Problem(at("subjects", i, str(k)), "unknown key (known keys: iss, sub)"))
        iss = _string(v.get("iss"), at("subjects", i, "iss"), problems)
        sub = _string(v.get("sub"), at("subjects", i, "sub"), problems)
        if iss is not None and sub is not None:
            subjects.add((iss, sub))

    plain: dict[str, set[str]] = {}
    for key in ("clients", "jtis"):
        out = plain[key] = set()
        for i, v in enumerate(lists[key]):
            s = _string(v, at(key, i), problems)
            if s is not None:
                out.add(s)

    value = Revocations(frozenset(spiffe_ids), frozenset(subjects), frozenset(plain["clients"]),
                        frozenset(plain["jtis"]))
    if require_entry and not problems and not any(lists.values()):
        problems.append(Problem(path, f"names no entry (give at least one of {', '.join(KEYS)})"))
    if max_entries is not None and count(value) > max_entries:
        problems.append(Problem(path, f"{count(value)} entries, at most {max_entries}"))
    return value, problems
