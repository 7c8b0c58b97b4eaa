"""Sidecar config: any text (YAML or not), with or without environment overrides, gives a Config
or a ConfigError, never another exception."""

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.config import parse_config
    from proxy.errors import ConfigError

from common import run


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    env = {}
    if fdp.ConsumeBool():
        env["PORTCULLIS_" + fdp.ConsumeUnicodeNoSurrogates(30)] = fdp.ConsumeUnicodeNoSurrogates(60)
    text = fdp.ConsumeUnicode(fdp.remaining_bytes())
    try:
        parse_config(text, env=env)
    except ConfigError:
        pass


if __name__ == "__main__":
    run(test_one_input)
