"""JWS / JWT: parse_jws and b64url_decode raise only InvalidValue (b64url is canonical);
verify_access_token gives claims or TokenError, for arbitrary strings and for correctly signed
tokens with arbitrary claims and header members."""

import json
import time

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.core import jose
    from proxy.core.tokens import IssuerPolicy, verify_access_token
    from proxy.errors import InvalidValue, TokenError

from common import run
from tests.tokens_factory import jwk_set, key, mint

ISS = "https://idp.example.org"
SIGNER = key("ES256", "fuzz")
ISSUERS = {ISS: (IssuerPolicy(ISS, frozenset({"aud"}), frozenset({"ES256"})), jwk_set(SIGNER))}


def _json_object(text: str):
    try:
        v = json.loads(text)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {"x": v}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    now = time.time()
    if mode == 0:
        text = fdp.ConsumeUnicode(fdp.remaining_bytes())
        try:
            out = jose.b64url_decode(text)
            assert jose.b64url_encode(out) == text
        except InvalidValue:
            pass
        try:
            jose.parse_jws(text)
        except InvalidValue:
            pass
        try:
            verify_access_token(text, ISSUERS, now)
            raise AssertionError("an unsigned string verified")
        except TokenError:
            pass
        return
    claims = _json_object(fdp.ConsumeUnicodeNoSurrogates(300))
    header = _json_object(fdp.ConsumeUnicodeNoSurrogates(100)) if mode == 2 else {}
    header.pop("alg", None)
    base = {"iss": ISS, "aud": "aud", "sub": "alice", "exp": int(now) + 60}
    try:
        token = mint(SIGNER, {**base, **claims}, **header)
    except (TypeError, ValueError):
        return  # not serialisable as a JWT by the test minter
    try:
        verify_access_token(token, ISSUERS, now)
    except TokenError:
        pass


if __name__ == "__main__":
    run(test_one_input)
