"""Request-target canonicalisation: only BadRequest; the result is a fixed point with the same
decoded segments; the fast path and the slow path agree."""

from urllib.parse import unquote_to_bytes

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.core.paths import _canonicalize_target_slow, canonicalize_path, canonicalize_target
    from proxy.errors import BadRequest

from common import run


def _segments(path: str) -> list[bytes]:
    return [s for s in unquote_to_bytes(path).split(b"/") if s]


def _run(f, raw):
    try:
        return f(raw)
    except BadRequest as err:
        assert err.code in ("invalid_target", "invalid_path")
        return err.code


def test_one_input(data: bytes) -> None:
    raw = data.decode("latin-1")  # as the listener decodes the request line
    got = _run(canonicalize_target, raw)
    assert got == _run(_canonicalize_target_slow, raw)
    if isinstance(got, str):
        return
    assert canonicalize_target(got.request_target) == got
    assert canonicalize_path(got.path) == got.path
    assert "//" not in got.path and not any(s in (".", "..") for s in got.path.split("/"))
    assert _segments(got.path) == _segments(raw.split("?", 1)[0])


if __name__ == "__main__":
    run(test_one_input)
