"""Policy documents: any file content (through the policy file loader) and any JSON document
(straight into the compiler) give a CompiledPolicy or a ConfigError, never another exception."""

import json

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.core.policy import compile_policy
    from proxy.errors import ConfigError
    from proxy.runtime.inputs import parse_policy_file

from common import run

TDS = frozenset({"example.org", "partner.org"})


def test_one_input(data: bytes) -> None:
    try:
        parse_policy_file(data, "0" * 64, source="fuzz", trust_domains=TDS)
    except ConfigError:
        pass
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        compile_policy(doc, source="fuzz", revision="r0", known_trust_domains=TDS)
    except ConfigError:
        pass


if __name__ == "__main__":
    run(test_one_input)
