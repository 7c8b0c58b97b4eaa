"""Shared hypothesis strategies: JSON-like values, mutations of valid documents."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# scalars YAML/JSON can produce, with the awkward ones on purpose
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", " ", "0", "-1", "1e400", "yes", "null", "*", "**", "/", "/**", "{x}",
                     "spiffe://", "spiffe://example.org", "spiffe://example.org/**", "GET",
                     "allow", "deny", "dpop", "mtls", "required", "ES256", "none", "é", "\x00",
                     "\ud800", "a" * 300]),
)

JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.none()),
                                            inner, max_size=4)),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: Any, rounds: int = 3) -> Any:
    """`base` with a few random edits: a value replaced, a key deleted, a key added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=rounds))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if kind == "replace":
                doc = draw(JSONISH)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if kind == "replace":
            parent[last] = draw(JSONISH)
        elif kind == "delete":
            del parent[last]
        else:
            target = parent[last]
            if isinstance(target, dict):
                target[draw(st.text(max_size=12))] = draw(JSONISH)
            elif isinstance(target, list):
                target.insert(draw(st.integers(0, len(target))), draw(JSONISH))
            else:
                parent[last] = [target, draw(JSONISH)]
    return doc
