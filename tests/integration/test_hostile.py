"""Hostile input end to end: limits, smuggling and parser discrepancies, header tricks, slow clients.

What a PEP must do on its worst day: garbage never crashes it, never loses an audit record and never
lets a request through; the upstream (a real one that records what it received) sees exactly the
request the sidecar authorised (same method, canonical target, same body bytes) or nothing.

Real mTLS on 127.0.0.1. Cases already covered in test_framing.py / test_forwarding.py are not
repeated here. Audit records are read after the sidecar stopped (the sink is flushed then).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httptools
import orjson
import pytest

from tests.conftest import RawClient
from tests.dpop_factory import ProofKey, make_proof
from tests.factories import BATCH_ID, FRONTEND_ID, SIDECAR_ID, free_port
from tests.tokens_factory import jwks_doc, key, mint


def get(path: str, *extra: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: svc\r\n" + b"".join(extra) + b"\r\n"


def post(*headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: svc\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked"
AFTER = get("/after")
SMUGGLED = get("/smuggled")


async def raw(sidecar, pki, who: str = "frontend") -> RawClient:
    return await RawClient.connect(sidecar.port, pki.client(who), pki)


async def audit_after_stop(sidecar) -> list[dict]:
    await sidecar.stop()  # drains and flushes the audit sink: every record is on disk
    return sidecar.records()


def echoed(body: bytes) -> dict:
    return orjson.loads(body)


def header_values(received, name: str) -> list[str]:
    return [v for n, v in received.headers if n.lower() == name]


async def send_all(c: RawClient, data: bytes, piece: int = 16384) -> None:
    """Send in pieces (separate reads on the sidecar side); stop quietly once it hung up."""
    try:
        for i in range(0, len(data), piece):
            await c.send(data[i:i + piece])
    except (ConnectionError, OSError):
        pass


async def assert_refused(sidecar, c: RawClient, upstream, status: int, code: str) -> dict:
    """The response is `status`/`code` with connection: close, the connection closes, nothing
    reached the upstream, and the one audit record says the same."""
    got, headers, body = await c.read_response()
    assert (got, echoed(body)["error"]) == (status, code), body
    assert headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    assert upstream.received == []
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["status"], rec["code"], rec["decision"]) == (status, code, "deny")
    assert rec["decision_id"] == echoed(body)["decision_id"]
    assert upstream.received == []
    return rec


# --------------------------------------------------------------------------------------------
# 1. limits: each configurable, each a clear status with an audit record
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,ok", [(0, True), (1, False)])
async def test_request_line_longer_than_max_request_line_bytes_gets_414(sidecar_factory, pki, upstream,
                                                                       extra, ok):
    sidecar = await sidecar_factory(extra={"listener": {"max_request_line_bytes": 1024}})
    target = "/" + "a" * (1024 - len("GET  HTTP/1.1") - 1 + extra)  # the line is 1024 (+1) bytes
    c = await raw(sidecar, pki)
    await c.send(get(target) + AFTER)
    if ok:
        status, _, body = await c.read_response()
        assert status == 200 and echoed(body)["target"] == target
        assert (await c.read_response())[0] == 200
        await c.close()
        assert [r["status"] for r in await audit_after_stop(sidecar)] == [200, 200]
        return
    rec = await assert_refused(sidecar, c, upstream, 414, "uri_too_long")
    assert rec["path"] == target[:256]  # bounded in the record


async def test_header_line_that_never_ends_is_cut_by_its_size_not_by_time(sidecar_factory, pki, upstream):
    # httptools buffers a header line until it ends: without a size check on the raw bytes, one
    # endless header grows the sidecar's memory (quadratically copied) until header_timeout_s
    sidecar = await sidecar_factory(extra={"listener": {"header_timeout_s": 60}})
    c = await raw(sidecar, pki)
    await send_all(c, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Endless: " + b"a" * (4 << 20))
    await assert_refused(sidecar, c, upstream, 431, "headers_too_large")


async def test_trailer_line_that_never_ends_is_cut(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 60}})
    c = await raw(sidecar, pki)
    await send_all(c, b"POST /t HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n0\r\nX-Endless-Trailer: " + b"a" * (4 << 20))
    await assert_refused(sidecar, c, upstream, 400, "chunk_framing_too_large")


@pytest.mark.parametrize("expect", [False, True])
async def test_declared_content_length_above_max_body_bytes_gets_413_before_forwarding(
        sidecar_factory, pki, upstream, expect):
    sidecar = await sidecar_factory(extra={"listener": {"max_body_bytes": 1000}})
    c = await raw(sidecar, pki)
    extra = b"Expect: 100-continue\r\n" if expect else b""
    # only the head: the answer must not wait for a body nobody will forward (and no 100 Continue)
    await c.send(get("/upload", extra, b"Content-Length: 1001\r\n", method=b"POST"))
    await assert_refused(sidecar, c, upstream, 413, "payload_too_large")


async def test_content_length_at_max_body_bytes_is_forwarded(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"max_body_bytes": 1000}})
    c = await raw(sidecar, pki)
    await c.send(get("/upload", b"Content-Length: 1000\r\n", method=b"POST") + b"b" * 1000)
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["body_len"] == 1000
    await c.close()
    assert [r["status"] for r in await audit_after_stop(sidecar)] == [200]


async def test_content_length_near_2_64_is_refused_by_the_default_limit(sidecar, pki, upstream):
    # llhttp accepts any value below 2^64: without a body limit this request waits forever and
    # everything pipelined after it becomes "body"
    c = await raw(sidecar, pki)
    await c.send(get("/upload", b"Content-Length: 18446744073709551615\r\n", method=b"POST") + SMUGGLED)
    await assert_refused(sidecar, c, upstream, 413, "payload_too_large")


async def test_max_body_bytes_zero_means_unlimited(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"max_body_bytes": 0}})
    c = await raw(sidecar, pki)
    body = b"z" * 300_000
    await send_all(c, get("/upload", b"Content-Length: %d\r\n" % len(body), method=b"POST") + body)
    status, _, resp = await c.read_response()
    assert status == 200 and echoed(resp)["body_len"] == len(body)
    await c.close()
    assert len(await audit_after_stop(sidecar)) == 1


async def test_chunked_body_growing_past_max_body_bytes_never_completes_upstream(sidecar_factory, pki,
                                                                                upstream):
    sidecar = await sidecar_factory(extra={"listener": {"max_body_bytes": 1000}})
    c = await raw(sidecar, pki)
    await c.send(AFTER)  # a pooled upstream connection: forwarding of the next request starts at once
    assert (await c.read_response())[0] == 200
    await c.send(b"POST /stream HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"258\r\n" + b"a" * 600 + b"\r\n")
    await asyncio.sleep(0.05)
    await c.send(b"258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n" + SMUGGLED)
    status, headers, body = await c.read_response()
    assert status == 413 and echoed(body)["error"] == "payload_too_large"
    assert headers["connection"] == "close" and await c.closed()
    await c.close()
    recs = await audit_after_stop(sidecar)
    assert [(r["status"], r["code"]) for r in recs] == [(200, "allowed"), (413, "payload_too_large")]
    assert [r.target for r in upstream.received] == ["/after"]  # the stream was never completed


async def test_chunk_size_of_2_64_minus_1_is_cut_at_max_body_bytes(sidecar_factory, pki, upstream):
    # llhttp accepts the largest 64-bit chunk size: every byte after it, pipelined requests
    # included, is "chunk data" that would stream upstream forever
    sidecar = await sidecar_factory(extra={"listener": {"max_body_bytes": 1000}})
    c = await raw(sidecar, pki)
    await send_all(c, post(CHUNKED, body=b"ffffffffffffffff\r\n") + SMUGGLED * 60)
    status, headers, body = await c.read_response()
    assert (status, echoed(body)["error"]) == (413, "payload_too_large")
    assert headers["connection"] == "close" and await c.closed()
    await c.close()
    assert upstream.received == []
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["status"], rec["code"]) == (413, "payload_too_large")


# -- token and DPoP proof sizes ----------------------------------------------------------------

ISS = "https://idp.example.org"
AUD = "https://orders.example.org"
TOKEN_POLICY = {
    "version": 1,
    "authentication": [
        {"paths": ["/dpop/**"], "token": "required", "binding": "dpop"},
        {"paths": ["/bearer/**"], "token": "required", "binding": "none"},
    ],
    "rules": [
        {"id": "alice", "effect": "allow", "from": {"subjects": [{"issuer": ISS, "sub": "alice"}]},
         "to": [{"paths": ["/dpop/**", "/bearer/**"]}]},
    ],
}


@pytest.fixture
async def token_sidecar(sidecar_factory, pki):
    signer = key("ES256", "idp-hostile")
    jwks = pki.root / "idp-jwks.json"
    jwks.write_text(json.dumps(jwks_doc(signer)))
    port = free_port()
    sc = await sidecar_factory(policy=TOKEN_POLICY, extra={
        "listener": {"address": "127.0.0.1", "port": port},
        "tokens": {"issuers": [{"issuer": ISS, "audiences": [AUD], "jwks_file": str(jwks)}],
                   "max_token_bytes": 1024,
                   "dpop": {"public_origin": f"https://127.0.0.1:{port}", "max_proof_bytes": 512}}})
    return sc, signer


def access_token(signer, **claims) -> str:
    now = int(time.time())
    return mint(signer, {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now,
                         **claims}, typ="at+jwt")


async def call(sc, *lines: str) -> tuple[int, dict, dict]:
    c = await raw(sc, sc.pki)
    await c.send(b"GET %s HTTP/1.1\r\nHost: svc\r\n" % lines[0].encode()
                 + b"".join(x.encode() + b"\r\n" for x in lines[1:]) + b"\r\n")
    status, headers, body = await c.read_response()
    await c.close()
    return status, headers, echoed(body)


async def test_access_token_over_max_token_bytes_gets_401_token_too_large(token_sidecar, upstream):
    sc, signer = token_sidecar
    ok = access_token(signer)
    big = access_token(signer, pad="x" * 1024)
    assert len(ok) <= 1024 < len(big)
    status, _, _ = await call(sc, "/bearer/1", f"Authorization: Bearer {ok}")
    assert status == 200
    status, headers, body = await call(sc, "/bearer/2", f"Authorization: Bearer {big}")
    assert (status, body["error"]) == (401, "token_too_large")
    assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert [r.target for r in upstream.received] == ["/bearer/1"]
    recs = await audit_after_stop(sc)
    assert [(r["status"], r["code"]) for r in recs] == [(200, "allowed"), (401, "token_too_large")]
    assert recs[1]["token_fingerprint"] == hashlib.sha256(big.encode()).hexdigest()
    assert big not in json.dumps(recs[1])  # a fingerprint, never the token


async def test_dpop_proof_over_max_proof_bytes_gets_401_dpop_too_large(token_sidecar, upstream):
    sc, signer = token_sidecar
    pk = ProofKey.generate("ES256")
    tok = access_token(signer, cnf={"jkt": pk.jkt})
    htu = f"https://127.0.0.1:{sc.port}/dpop/1"
    proof = make_proof(pk, method="GET", htu=htu, iat=int(time.time()), access_token=tok)
    assert len(proof) <= 512
    status, _, _ = await call(sc, "/dpop/1", f"Authorization: DPoP {tok}", f"DPoP: {proof}")
    assert status == 200
    big = make_proof(pk, method="GET", htu=htu, iat=int(time.time()), access_token=tok,
                     claims={"pad": "x" * 300})
    assert len(big) > 512
    status, headers, body = await call(sc, "/dpop/1", f"Authorization: DPoP {tok}", f"DPoP: {big}")
    assert (status, body["error"]) == (401, "dpop_too_large")
    assert headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof", algs=')
    assert len(upstream.received) == 1
    recs = await audit_after_stop(sc)
    assert [(r["status"], r["code"]) for r in recs] == [(200, "allowed"), (401, "dpop_too_large")]
    assert "proof_fingerprint" in recs[1] and big not in json.dumps(recs[1])


# --------------------------------------------------------------------------------------------
# 2. smuggling and parser discrepancies: refused (400, nothing upstream) or forwarded canonically
# --------------------------------------------------------------------------------------------

REFUSED = {
    # Transfer-Encoding / Content-Length in other orders, cases and spellings
    "te_then_cl": (post(CHUNKED, b"Content-Length: 5", body=b"0\r\n\r\n"), "malformed_request"),
    "te_upper_then_cl_lower": (post(b"TRANSFER-ENCODING: CHUNKED", b"content-length: 3", body=b"abc"),
                               "malformed_request"),
    "te_tab_around": (post(b"Transfer-Encoding:\tchunked\t", body=b"0\r\n\r\n"), "malformed_request"),
    "te_vertical_tab": (post(b"Transfer-Encoding: chunked\x0b", body=b"0\r\n\r\n"), "malformed_request"),
    "te_form_feed": (post(b"Transfer-Encoding: \x0cchunked", body=b"0\r\n\r\n"), "malformed_request"),
    "te_chunked_chunked_one_line": (post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"),
                                    "malformed_request"),
    "te_trailing_comma": (post(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n"), "malformed_request"),
    "te_empty": (post(b"Transfer-Encoding: ", b"Content-Length: 3", body=b"abc"), "malformed_request"),
    "te_identity_and_cl": (post(b"Transfer-Encoding: identity", b"Content-Length: 3", body=b"abc"),
                           "malformed_request"),
    "te_space_before_colon": (post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), "malformed_request"),
    "te_in_trailer": (post(CHUNKED, body=b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
                      "malformed_request"),
    "cl_in_trailer": (post(CHUNKED, body=b"3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n"), "malformed_request"),
    # chunk sizes and extensions
    "chunk_ext_quoted_crlf": (post(CHUNKED, body=b'3;a="x\r\n"\r\nabc\r\n0\r\n\r\n'), "malformed_request"),
    "chunk_ext_empty": (post(CHUNKED, body=b"3;\r\nabc\r\n0\r\n\r\n"), "malformed_request"),
    "chunk_size_trailing_space": (post(CHUNKED, body=b"3 \r\nabc\r\n0\r\n\r\n"), "malformed_request"),
    "chunk_size_negative": (post(CHUNKED, body=b"-3\r\nabc\r\n0\r\n\r\n"), "malformed_request"),
    "chunk_size_0x": (post(CHUNKED, body=b"0x3\r\nabc\r\n0\r\n\r\n"), "malformed_request"),
    "chunk_data_longer_than_size": (post(CHUNKED, body=b"3\r\nabcd\r\n0\r\n\r\n"), "malformed_request"),
    # Content-Length values
    "cl_inner_space": (post(b"Content-Length: 1 3", body=b"abc"), "malformed_request"),
    "cl_negative": (post(b"Content-Length: -3", body=b"abc"), "malformed_request"),
    "cl_empty": (post(b"Content-Length: ", body=b"abc"), "malformed_request"),
    "cl_underscore_digits": (post(b"Content-Length: 1_0", body=b"abc"), "malformed_request"),
    "cl_hex": (post(b"Content-Length: 0x3", body=b"abc"), "malformed_request"),
    "cl_vertical_tab": (post(b"Content-Length: 3\x0b", body=b"abc"), "malformed_request"),
    "cl_over_2_64": (post(b"Content-Length: 99999999999999999999999", body=b"abc"), "malformed_request"),
    # \r\n versus \n, mixed
    "lf_after_request_line": (b"GET /a HTTP/1.1\nHost: svc\r\n\r\n", "malformed_request"),
    "lf_ends_head": (b"GET /a HTTP/1.1\r\nHost: svc\r\n\n", "malformed_request"),
    "lf_cr_ends_head": (b"GET /a HTTP/1.1\r\nHost: svc\r\n\n\r\n", "malformed_request"),
    "cr_cr_lf": (b"GET /a HTTP/1.1\r\nHost: svc\r\r\n\r\n", "malformed_request"),
    "lf_after_chunk_size": (post(CHUNKED, body=b"3\nabc\r\n0\r\n\r\n"), "malformed_request"),
    "lf_after_chunk_data": (post(CHUNKED, body=b"3\r\nabc\n0\r\n\r\n"), "malformed_request"),
    "lf_after_last_chunk": (post(CHUNKED, body=b"3\r\nabc\r\n0\n\n"), "malformed_request"),
    # header values: CR, DEL, other controls
    "cr_in_value": (get("/a", b"X-A: a\rb\r\n"), "malformed_request"),
    "del_in_value": (get("/a", b"X-A: a\x7fb\r\n"), "malformed_request"),
    "ctl_in_value": (get("/a", b"X-A: a\x01b\r\n"), "malformed_request"),
    "nul_in_identity_value": (get("/a", b"X-Portcullis-Spiffe-Id: spiffe://example.org/x\x00\r\n"),
                              "malformed_request"),
    # header names with non-token characters
    "name_space": (get("/a", b"X A: 1\r\n"), "malformed_request"),
    "name_at": (get("/a", b"X@A: 1\r\n"), "malformed_request"),
    "name_quote": (get("/a", b'X"A: 1\r\n'), "malformed_request"),
    "name_parens": (get("/a", b"X(A): 1\r\n"), "malformed_request"),
    "name_slash": (get("/a", b"X/A: 1\r\n"), "malformed_request"),
    "name_empty": (get("/a", b": 1\r\n"), "malformed_request"),
    "name_non_ascii": (get("/a", b"X\xc3\xa9: 1\r\n"), "malformed_request"),
    "name_tab_before_colon": (get("/a", b"Transfer-Encoding\t: chunked\r\n"), "malformed_request"),
    "name_without_colon": (get("/a", b"X-A 1\r\n"), "malformed_request"),
    "first_header_folded": (b"GET /a HTTP/1.1\r\n Host: svc\r\n\r\n", "malformed_request"),
    "whitespace_only_line": (get("/a", b"X-A: 1\r\n \r\n"), "malformed_request"),
    # request lines
    "authority_form": (b"GET svc:443 HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "lowercase_method": (b"get /a HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "unknown_method": (b"FOO /a HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "tab_separator": (b"GET\t/a HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "lowercase_version": (b"GET /a http/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "space_in_target": (b"GET /a b HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "raw_utf8_in_target": (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: svc\r\n\r\n", "malformed_request"),
    "http2_preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed_request"),
    "http09": (b"GET /a\r\n\r\n", "unsupported_http_version"),
    # Host values an upstream could read as another authority
    "host_userinfo": (b"GET /a HTTP/1.1\r\nHost: user@svc\r\n\r\n", "invalid_host"),
    "host_userinfo_port": (b"GET /a HTTP/1.1\r\nHost: svc:443@evil\r\n\r\n", "invalid_host"),
    "host_path": (b"GET /a HTTP/1.1\r\nHost: svc/admin\r\n\r\n", "invalid_host"),
    "host_list": (b"GET /a HTTP/1.1\r\nHost: svc, evil\r\n\r\n", "invalid_host"),
    "host_space": (b"GET /a HTTP/1.1\r\nHost: svc evil\r\n\r\n", "invalid_host"),
    "host_query": (b"GET /a HTTP/1.1\r\nHost: svc?x\r\n\r\n", "invalid_host"),
    "host_percent": (b"GET /a HTTP/1.1\r\nHost: sv%63\r\n\r\n", "invalid_host"),
    "host_bad_port": (b"GET /a HTTP/1.1\r\nHost: svc:80x\r\n\r\n", "invalid_host"),
    "host_http10_userinfo": (b"GET /a HTTP/1.0\r\nHost: a@b\r\n\r\n", "invalid_host"),
    "host_case_duplicate": (b"GET /a HTTP/1.1\r\nhost: svc\r\nHOST: svc\r\n\r\n", "invalid_host"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_ambiguous_request_is_refused_and_nothing_reaches_the_upstream(sidecar, pki, upstream, case):
    data, code = REFUSED[case]
    c = await raw(sidecar, pki)
    await c.send(data + SMUGGLED)
    await assert_refused(sidecar, c, upstream, 400, code)


# (request bytes, method, target, body the upstream must get, framing header it must get)
ACCEPTED = {
    "te_uppercase": (post(b"TRANSFER-ENCODING: CHUNKED", body=b"3\r\nabc\r\n0\r\n\r\n"),
                     "POST", "/p", b"abc", ("transfer-encoding", "chunked")),
    "te_surrounding_spaces": (post(b"Transfer-Encoding:   chunked ", body=b"3\r\nabc\r\n0\r\n\r\n"),
                              "POST", "/p", b"abc", ("transfer-encoding", "chunked")),
    "chunk_ext_quoted": (post(CHUNKED, body=b'3;a="x;y=z\\"";b=c\r\nabc\r\n0\r\n\r\n'),
                         "POST", "/p", b"abc", ("transfer-encoding", "chunked")),
    "chunk_size_leading_zeros": (post(CHUNKED, body=b"0000000000000000000003\r\nabc\r\n0\r\n\r\n"),
                                 "POST", "/p", b"abc", ("transfer-encoding", "chunked")),
    "chunk_size_uppercase_hex": (post(CHUNKED, body=b"A\r\n0123456789\r\n0\r\n\r\n"),
                                 "POST", "/p", b"0123456789", ("transfer-encoding", "chunked")),
    "cl_leading_zeros": (post(b"Content-Length: 0003", body=b"abc"), "POST", "/p", b"abc",
                         ("content-length", "3")),
    "cl_surrounding_whitespace": (post(b"Content-Length: \t 3 \t", body=b"abc"), "POST", "/p", b"abc",
                                  ("content-length", "3")),
    "cl_zero": (post(b"Content-Length: 0"), "POST", "/p", b"", ("content-length", "0")),
    "get_with_body": (get("/g", b"Content-Length: 3\r\n") + b"abc", "GET", "/g", b"abc",
                      ("content-length", "3")),
    "get_with_chunked_body": (get("/g", CHUNKED + b"\r\n") + b"3\r\nabc\r\n0\r\n\r\n", "GET", "/g", b"abc",
                              ("transfer-encoding", "chunked")),
    "delete_with_body": (get("/d", b"Content-Length: 3\r\n", method=b"DELETE") + b"abc", "DELETE", "/d",
                         b"abc", ("content-length", "3")),
    "underscore_framing_names_are_not_framing": (
        post(b"Transfer_Encoding: chunked", b"Content_Length: 10", b"Content-Length: 3", body=b"abc"),
        "POST", "/p", b"abc", ("content-length", "3")),
    "two_spaces_in_request_line": (b"GET  /two HTTP/1.1\r\nHost: svc\r\n\r\n", "GET", "/two", b"", None),
    "empty_lines_before_request": (b"\r\n\r\n" + get("/e"), "GET", "/e", b"", None),
    "non_canonical_target": (get("/x//%61dmin/%7e"), "GET", "/x/admin/~", b"", None),
    "expect_body_sent_at_once": (get("/x", b"Expect: 100-continue\r\nContent-Length: 3\r\n", method=b"PUT")
                                 + b"abc", "PUT", "/x", b"abc", ("content-length", "3")),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
async def test_unusual_but_unambiguous_request_is_forwarded_canonically(sidecar, pki, upstream, case):
    data, method, target, body, framing = ACCEPTED[case]
    c = await raw(sidecar, pki)
    await c.send(data + AFTER)
    statuses = []
    for _ in range(2):
        status, _, _ = await c.read_response()
        statuses.append(status)
    assert statuses[-1] == 200 and statuses[0] in (100, 200)
    if statuses[0] == 100:
        assert (await c.read_response())[0] == 200
    await c.close()
    first, after = upstream.received
    assert (first.method, first.target, first.body) == (method, target, body)
    assert (after.method, after.target, after.body) == ("GET", "/after", b"")  # still in sync
    lnames = [n.lower() for n, _ in first.headers]
    assert lnames.count("host") == 1
    assert lnames.count("content-length") + lnames.count("transfer-encoding") == (framing is not None)
    if framing is not None:
        assert header_values(first, framing[0]) == [framing[1]]
    assert not {"content_length", "transfer_encoding"} & set(lnames)
    assert [r["status"] for r in await audit_after_stop(sidecar)] == [200, 200]


async def test_head_with_a_body_keeps_both_sides_in_sync(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/h", b"Content-Length: 3\r\n", method=b"HEAD") + b"abc" + AFTER)
    status, headers, _ = await c.read_response(head=True)
    assert status == 200 and int(headers["content-length"]) > 0  # no body follows a HEAD response
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["target"] == "/after"
    await c.close()
    assert [(r.method, r.target, r.body) for r in upstream.received] == [
        ("HEAD", "/h", b"abc"), ("GET", "/after", b"")]
    assert len(await audit_after_stop(sidecar)) == 2


@pytest.mark.parametrize("target,host", [
    (b"http://svc/a", b"svc"),                  # absolute-form agreeing with Host
    (b"http://evil.example/admin", b"svc"),     # disagreeing with Host
    (b"https://svc:8443/a?x=1", b"svc:8443"),
    (b"*", b"svc"),                             # asterisk-form outside OPTIONS...
    (b"/a#frag", b"svc"),
])
async def test_non_origin_form_targets_are_refused_whatever_host_says(sidecar, pki, upstream, target,
                                                                      host):
    method = b"OPTIONS" if target == b"*" else b"GET"
    c = await raw(sidecar, pki)
    await c.send(method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" + AFTER)
    status, headers, body = await c.read_response()
    assert (status, echoed(body)["error"]) == (400, "invalid_target")
    # a well-framed request refused by the decision: the connection stays usable
    assert "connection" not in headers
    status, _, body = await c.read_response()
    assert status == 200 and echoed(body)["target"] == "/after"
    await c.close()
    assert [r.target for r in upstream.received] == ["/after"]
    recs = await audit_after_stop(sidecar)
    assert [(r["status"], r["code"]) for r in recs] == [(400, "invalid_target"), (200, "allowed")]


async def test_request_smuggled_inside_a_content_length_body_stays_body(sidecar, pki, upstream):
    inner = get("/admin/smuggled")
    c = await raw(sidecar, pki)
    await c.send(post(b"Content-Length: %d" % len(inner), body=inner) + AFTER)
    assert [(await c.read_response())[0] for _ in range(2)] == [200, 200]
    await c.close()
    assert [(r.method, r.target, r.body) for r in upstream.received] == [
        ("POST", "/p", inner), ("GET", "/after", b"")]
    assert len(await audit_after_stop(sidecar)) == 2


async def test_chunk_data_that_looks_like_the_last_chunk_stays_body(sidecar, pki, upstream):
    # the sidecar re-chunks: data that spells "0\r\n\r\n<request>" must reach the upstream as data
    inner = b"0\r\n\r\n" + get("/admin/smuggled")
    c = await raw(sidecar, pki)
    await c.send(post(CHUNKED, body=b"%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner)) + AFTER)
    assert [(await c.read_response())[0] for _ in range(2)] == [200, 200]
    await c.close()
    assert [(r.method, r.target, r.body) for r in upstream.received] == [
        ("POST", "/p", inner), ("GET", "/after", b"")]
    assert len(await audit_after_stop(sidecar)) == 2


async def test_request_after_an_empty_body_is_authorised_on_its_own(sidecar, pki, upstream):
    # the CL.0 trick: what a lenient front end would take for body is a request of its own here,
    # and the policy decides it like any other (batch may read reports, never /admin)
    c = await raw(sidecar, pki, "batch")
    await c.send(get("/reports/1", b"Content-Length: 0\r\n") + get("/admin/users") + get("/reports/2"))
    assert [(await c.read_response())[0] for _ in range(3)] == [200, 403, 200]
    await c.close()
    assert [r.target for r in upstream.received] == ["/reports/1", "/reports/2"]
    recs = await audit_after_stop(sidecar)
    assert [(r["decision"], r["path"]) for r in recs] == [
        ("allow", "/reports/1"), ("deny", "/admin/users"), ("allow", "/reports/2")]
    assert all(r["workload"]["spiffe_id"] == BATCH_ID for r in recs)


async def test_body_sent_after_a_denied_expect_100_continue_is_never_forwarded(sidecar, pki, upstream):
    c = await raw(sidecar, pki, "batch")
    inner = get("/reports/1")  # allowed on its own: it must still not come through as a request
    await c.send(get("/admin/x", b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(inner),
                     method=b"POST"))
    status, headers, _ = await c.read_response()
    assert status == 403 and headers["connection"] == "close"  # no 100 Continue first
    await send_all(c, inner + get("/reports/2"))
    assert await c.closed()
    await c.close()
    assert upstream.received == []
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["decision"], rec["status"], rec["rule_id"]) == ("deny", 403, "batch-admin-deny")


class RawUpstream:
    """An upstream that keeps every byte the sidecar sent it and answers each request `200 ok`."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.complete = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "RawUpstream":
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _RawConn(self), "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]


class _RawConn(asyncio.Protocol):
    def __init__(self, srv: RawUpstream) -> None:
        self.srv = srv
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.srv.data += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.srv.complete += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def test_chunk_extensions_and_trailers_never_reach_the_upstream(sidecar_factory, pki):
    up = await RawUpstream().start()
    sidecar = await sidecar_factory(upstream_url=up.url)
    c = await raw(sidecar, pki)
    await c.send(post(CHUNKED, body=b'3;sig="ext-secret";x=1\r\nabc\r\n'
                                    b"4;ext-two\r\ndefg\r\n"
                                    b"0;last=ext-three\r\n"
                                    b"X-Portcullis-Spiffe-Id: spiffe://example.org/admin\r\n"
                                    b"X-Trailer: trailer-secret\r\n\r\n"))
    status, _, body = await c.read_response()
    assert (status, body) == (200, b"ok")
    await c.close()
    await sidecar.stop()
    sent = bytes(up.data)
    head, _, rest = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /p HTTP/1.1\r\n") and b"\r\ntransfer-encoding: chunked" in head
    assert b"ext" not in rest and b"trailer" not in rest.lower() and b"spiffe://example.org/admin" not in sent
    parts, pos = [], 0  # re-chunked with bare sizes: size CRLF data CRLF ... 0 CRLF CRLF
    while True:
        end = rest.index(b"\r\n", pos)
        size = int(rest[pos:end], 16)
        if size == 0:
            assert rest[end:] == b"\r\n\r\n"
            break
        parts.append(rest[end + 2:end + 2 + size])
        pos = end + 4 + size
    assert b"".join(parts) == b"abcdefg"
    assert up.complete == 1
    up.server.close()


async def test_very_long_chunk_extension_is_refused(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory()
    c = await raw(sidecar, pki)
    await c.send(AFTER)
    assert (await c.read_response())[0] == 200
    await send_all(c, post(CHUNKED, body=b"3;ext=" + b"x" * (1 << 20) + b"\r\nabc\r\n0\r\n\r\n") + SMUGGLED)
    status, headers, body = await c.read_response()
    assert (status, echoed(body)["error"]) == (400, "chunk_framing_too_large")
    assert await c.closed()
    await c.close()
    assert [r.target for r in upstream.received] == ["/after"]
    recs = await audit_after_stop(sidecar)
    assert [(r["status"], r["code"]) for r in recs] == [(200, "allowed"), (400, "chunk_framing_too_large")]


async def test_modest_chunk_extensions_on_many_small_chunks_are_accepted(sidecar, pki, upstream):
    data = b"".join(b"1;n=%d\r\n%c\r\n" % (i, 97 + i % 26) for i in range(2000)) + b"0\r\n\r\n"
    c = await raw(sidecar, pki)
    await send_all(c, post(CHUNKED, body=data), piece=4096)
    status, _, _ = await c.read_response()
    assert status == 200
    await c.close()
    assert upstream.received[0].body == bytes(97 + i % 26 for i in range(2000))
    assert len(await audit_after_stop(sidecar)) == 1


# --------------------------------------------------------------------------------------------
# 3. header tricks
# --------------------------------------------------------------------------------------------


async def test_configured_identity_header_names_cannot_be_forged_in_any_spelling(sidecar_factory, pki,
                                                                                upstream):
    sidecar = await sidecar_factory(extra={"headers": {
        "spiffe_id": "x-caller-id", "decision_id": "x-decision", "request_id": "x-trace-id"}})
    c = await raw(sidecar, pki)
    await c.send(get("/id",
                     b"X-CALLER-ID: spiffe://example.org/admin\r\n",
                     b"x_caller_id: spiffe://example.org/admin\r\n",
                     b"X-Caller_Id: spiffe://example.org/admin, " + FRONTEND_ID.encode() + b"\r\n",
                     b"X_DECISION: forged\r\n",
                     b"x-decision: forged\r\n",
                     b"X_Trace_Id: forged-by-underscore\r\n",
                     b"X-Forwarded-Client-Cert: By=x;URI=spiffe://example.org/admin\r\n",
                     b"X_FORWARDED_CLIENT_CERT: URI=spiffe://example.org/admin\r\n",
                     b"x-forwarded-client-cert: URI=spiffe://a,URI=spiffe://b\r\n",
                     b"X-Portcullis_Spiffe-ID: spiffe://example.org/admin\r\n",
                     b"Connection: x-caller-id, x_decision\r\n"))
    status, _, body = await c.read_response()
    assert status == 200
    await c.close()
    (got,) = upstream.received
    norm = [(n.lower().replace("_", "-"), v) for n, v in got.headers]
    by = {}
    for n, v in norm:
        by.setdefault(n, []).append(v)
    assert by["x-caller-id"] == [FRONTEND_ID]
    assert len(by["x-decision"]) == 1 and by["x-decision"] != ["forged"]
    assert len(by["x-trace-id"]) == 1 and by["x-trace-id"] != ["forged-by-underscore"]
    (xfcc,) = by["x-forwarded-client-cert"]
    assert xfcc.startswith(f"By={SIDECAR_ID};") and xfcc.endswith(f";URI={FRONTEND_ID}")
    assert not any(n.startswith("x-portcullis-") for n in by)
    (rec,) = await audit_after_stop(sidecar)
    assert by["x-decision"] == [rec["decision_id"]] and by["x-trace-id"] == [rec["request_id"]]


@pytest.mark.parametrize("host", [b"svc:8443", b"[::1]:8443", b"10.0.0.1", b"svc.", b"svc ", b""])
async def test_valid_host_forms_are_forwarded(sidecar, pki, upstream, host):
    c = await raw(sidecar, pki)
    await c.send(b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    status, _, _ = await c.read_response()
    assert status == 200
    await c.close()
    # forwarded as received (trailing whitespace is optional whitespace, not part of the value)
    assert [v.rstrip() for v in header_values(upstream.received[0], "host")] == [host.strip().decode()]
    assert len(await audit_after_stop(sidecar)) == 1


async def test_connection_naming_host_still_sends_exactly_one_host(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/h", b"Connection: host, content-length\r\nContent-Length: 2\r\n") + b"hi")
    status, _, _ = await c.read_response()
    assert status == 200
    await c.close()
    (got,) = upstream.received
    assert [n.lower() for n, _ in got.headers].count("host") == 1
    assert header_values(got, "content-length") == ["2"] and got.body == b"hi"
    assert len(await audit_after_stop(sidecar)) == 1


async def test_obs_text_in_a_value_is_forwarded_byte_for_byte(sidecar, pki, upstream):
    c = await raw(sidecar, pki)
    await c.send(get("/o", b"X-Latin: caf\xe9 \xff\r\n"))
    assert (await c.read_response())[0] == 200
    await c.close()
    assert header_values(upstream.received[0], "x-latin") == ["caf\xe9 \xff"]
    assert len(await audit_after_stop(sidecar)) == 1


# --------------------------------------------------------------------------------------------
# 4. slow clients
# --------------------------------------------------------------------------------------------


async def test_slowloris_head_from_the_first_byte_gets_408(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"header_timeout_s": 0.5, "idle_timeout_s": 30}})
    c = await raw(sidecar, pki)
    head = get("/slow", b"X-Pad: " + b"p" * 100 + b"\r\n")
    for i in range(len(head) - 2):  # one byte every 100 ms, never the final CRLF
        try:
            await c.send(head[i:i + 1])
        except (ConnectionError, OSError):
            break
        await asyncio.sleep(0.1)
        if c.reader.at_eof():  # the sidecar answered and closed
            break
    status, headers, body = await c.read_response()
    assert (status, echoed(body)["error"]) == (408, "request_timeout")
    assert headers["connection"] == "close" and await c.closed()
    await c.close()
    assert upstream.received == []
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["status"], rec["code"], rec["decision"]) == (408, "request_timeout", "deny")


async def test_empty_lines_do_not_keep_an_idle_connection_open(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 0.5}})
    c = await raw(sidecar, pki)
    closed = False
    for _ in range(50):  # CRLF every 100 ms: not a request, so not activity
        try:
            await c.send(b"\r\n")
        except (ConnectionError, OSError):
            closed = True
            break
        await asyncio.sleep(0.1)
        if c.reader.at_eof():
            closed = True
            break
    assert closed or await c.closed(timeout=1)
    await c.close()
    assert await audit_after_stop(sidecar) == []
    assert upstream.received == []


async def test_moving_body_is_not_cut_but_a_stalled_one_is_at_idle_timeout(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"idle_timeout_s": 0.6}})
    c = await raw(sidecar, pki)
    await c.send(b"POST /trickle HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(15):  # 1.5 s of body, a chunk every 100 ms: longer than idle_timeout_s in total
        await c.send(b"1\r\nx\r\n")
        await asyncio.sleep(0.1)
    assert not c.reader.at_eof()  # still streaming: not answered, not closed
    status, headers, body = await c.read_response()  # now it stalls
    assert (status, echoed(body)["error"]) == (408, "body_timeout")
    assert headers["connection"] == "close" and await c.closed()
    await c.close()
    assert upstream.received == []  # the upstream never saw the request complete
    (rec,) = await audit_after_stop(sidecar)
    assert (rec["status"], rec["code"]) == (408, "body_timeout")


async def test_max_connections_is_enforced_and_the_sidecar_keeps_serving(sidecar_factory, pki, upstream):
    sidecar = await sidecar_factory(extra={"listener": {"max_connections": 2}})
    a, b = await raw(sidecar, pki), await raw(sidecar, pki)
    await a.send(get("/a"))
    assert (await a.read_response())[0] == 200
    extra = await raw(sidecar, pki)  # the third: the handshake completes, then it is closed
    assert await extra.closed()
    await extra.close()
    for c, path in ((b, "/b"), (a, "/a2")):  # the two admitted ones keep serving
        await c.send(get(path))
        assert (await c.read_response())[0] == 200
    await a.close()
    for _ in range(200):  # the sidecar notices the close
        if len(sidecar.worker.plane.conns) < 2:
            break
        await asyncio.sleep(0.01)
    again = await raw(sidecar, pki)  # room again
    await again.send(get("/again"))
    assert (await again.read_response())[0] == 200
    await again.close()
    await b.close()
    assert [r.target for r in upstream.received] == ["/a", "/b", "/a2", "/again"]
    assert len(await audit_after_stop(sidecar)) == 4
