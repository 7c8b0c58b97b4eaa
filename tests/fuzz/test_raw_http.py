"""Raw HTTP into the real data plane (see `http_harness` for what is checked): hypothesis
generates request streams, mostly well formed, some odd in one part, a few odd all over, with
byte-level mutations now and then, pipelined, and split at random read boundaries."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.http_harness import Env, check_stream, start_env, stop_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = start_env(tmp_path_factory.mktemp("raw-http"))
    yield e
    stop_env(e)


# -- generated request streams ------------------------------------------------------------------

_METHODS = st.sampled_from(["GET"] * 6 + ["POST"] * 4 + ["HEAD", "PUT", "DELETE", "OPTIONS", "PATCH",
                            "CONNECT", "TRACE", "PRI", "get", "M-SEARCH", "GE T", ""])
_TARGETS = st.one_of(
    st.sampled_from(["/f", "/f/a?x=1", "/f/%61", "/f//x", "/f/./x", "/f/%2e%2e/x", "/f;a", "/f/%2F",
                     "/f?", "/f#x", "*", "http://svc/f", "svc:443", "", "/f a", "/f/\xe9", "/f/%00"]),
    st.lists(st.sampled_from(["/", "f", "a", "%41", "%2f", ".", "..", "?", "&", "=", ";", "%", "~", "@"]),
             max_size=8).map(lambda p: "/f" + "".join(p)),
)
_VERSIONS = st.sampled_from(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.10", "HTTP/0.9"])
_EOLS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"])
_NAMES = st.sampled_from(["Host", "host", "Content-Length", "content-length", "Transfer-Encoding",
                          "Connection", "Expect", "X-Portcullis-Spiffe-Id", "x_forwarded_client_cert",
                          "X-Request-Id", "Upgrade", "Authorization", "Trailer", "TE", "Keep-Alive",
                          "X-Ok", "X A", "", "X\xe9", "Transfer_Encoding"])
_VALUES = st.sampled_from(["svc", "chunked", "CHUNKED", " chunked", "chunked, chunked", "gzip, chunked",
                           "identity", "close", "keep-alive", "100-continue", "0", "3", "5", "10",
                           "-1", "1 2", "+4", "04", "18446744073709551616", "upgrade", "h2c",
                           "Bearer x", "a\x00b", "x\x7f", "\xe9", " spaced ", "user@svc", "svc/x",
                           "x-ok", "content-length", "transfer-encoding, x-portcullis-spiffe-id", ""])


def _chunked(data: bytes, ext: bool) -> bytes:
    out = b""
    for i in range(0, len(data), 5):
        piece = data[i:i + 5]
        out += b"%x%s\r\n%s\r\n" % (len(piece), b";e=1" if ext else b"", piece)
    return out + b"0\r\n\r\n"


_CLEAN_HEADERS = st.sampled_from(["Accept: */*", "X-Ok: 1", "X-Request-Id: r-1", "Connection: keep-alive",
                                  "X-Portcullis-Spiffe-Id: spiffe://example.org/admin",
                                  "X_Forwarded_Client_Cert: URI=spiffe://example.org/admin",
                                  "Expect: 100-continue", "Connection: x-ok", "Authorization: Bearer x"])


@st.composite
def _request(draw) -> bytes:
    """Most requests are well formed (so that later pipelined ones are reached and forwarding is
    exercised); some have one odd part; a few are odd all over."""
    odd = draw(st.sampled_from(["none"] * 5 + ["line", "eol", "header", "framing", "all"]))
    eol = draw(_EOLS) if odd in ("eol", "all") else b"\r\n"
    if odd in ("line", "all"):
        line = f"{draw(_METHODS)} {draw(_TARGETS)} {draw(_VERSIONS)}"
    else:
        line = f"{draw(st.sampled_from(['GET', 'GET', 'POST', 'HEAD', 'PUT', 'DELETE']))} " \
               f"{draw(st.sampled_from(['/f', '/f/a', '/f/b?x=1', '/f/%61', '/f//a/b', '/f/b', '/f/c/']))} HTTP/1.1"
    headers = [] if odd == "all" and draw(st.booleans()) else [b"Host: svc"]
    headers += [h.encode() for h in draw(st.lists(_CLEAN_HEADERS, max_size=2))]
    if odd in ("header", "all"):
        for name, value in draw(st.lists(st.tuples(_NAMES, _VALUES), min_size=1, max_size=3)):
            headers.append(f"{name}: {value}".encode("utf-8", "surrogatepass"))
    body = draw(st.binary(max_size=24))
    kind = draw(st.sampled_from(["none", "none", "length", "length", "chunked"]
                                + (["raw", "both"] if odd in ("framing", "all") else [])))
    if kind == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif kind == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        body = _chunked(body, draw(st.booleans()))
    elif kind == "both":
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    elif kind == "none":
        body = b""
    return eol.join([line.encode("utf-8", "surrogatepass"), *headers, b""]) + eol + body


@st.composite
def _stream(draw) -> list[bytes]:
    data = b"".join(draw(st.lists(_request(), min_size=1, max_size=3)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # byte-level mutations, now and then
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        b = draw(st.sampled_from([0x00, 0x0a, 0x0d, 0x20, 0x3a, 0x7f, 0xff, ord("0"), ord("G")]))
        if op == "flip":
            data = data[:i] + bytes([b]) + data[i + 1:]
        elif op == "insert":
            data = data[:i] + bytes([b]) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1:]
        else:
            data = data[:i]
    cuts = sorted(set(draw(st.lists(st.integers(0, max(len(data), 1)), max_size=4))))
    pieces, prev = [], 0
    for c in cuts + [len(data)]:
        if c > prev:
            pieces.append(data[prev:c])
            prev = c
    return pieces or [b""]


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(_stream())
def test_any_request_stream_gets_well_formed_answers_and_one_record_per_head(env: Env, chunks):
    n_up = len(env.upstream.received)
    recs = check_stream(env, chunks)
    for r in recs:
        event(f"status {r['status']} {r['code']}")
    event(f"forwarded {len(env.upstream.received) - n_up}")
