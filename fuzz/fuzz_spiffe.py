"""SPIFFE IDs and trust domains: only InvalidValue, and what is accepted is the spec's grammar."""

import re

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.core.spiffe import parse_spiffe_id, parse_trust_domain
    from proxy.errors import InvalidValue

from common import run

GRAMMAR = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)*")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    value = fdp.ConsumeUnicode(fdp.remaining_bytes())
    try:
        parsed = parse_spiffe_id(value)
    except InvalidValue:
        assert not (GRAMMAR.fullmatch(value) and len(value.encode("utf-8", "surrogatepass")) <= 2048)
    else:
        assert GRAMMAR.fullmatch(value) and str(parsed) == value
    try:
        assert parse_trust_domain(value) == value
    except InvalidValue:
        pass


if __name__ == "__main__":
    run(test_one_input)
