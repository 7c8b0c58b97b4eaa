"""Raw HTTP into the real data plane (real parser, listener, pipeline, policy, forwarding to a
recording upstream, audit sink), with the checks of `tests/fuzz/http_harness.py`: well-formed
responses, no made-up 5xx but 502/503/504, one audit record per request head, nothing forwarded
that was not allowed. The first input byte says where the stream is split into reads."""

import os
import shutil
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from tests.fuzz.http_harness import check_stream, start_env

from common import run

# a throw-away PKI and config (replaced on every run; libFuzzer exits without Python's atexit)
_WORK = Path(os.environ.get("FUZZ_WORKDIR", Path(__file__).resolve().parent / "work")) / "http"
shutil.rmtree(_WORK, ignore_errors=True)
_WORK.mkdir(parents=True)
ENV = start_env(_WORK)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    splits, stream = data[0] % 5, data[1:]
    chunks, prev = [], 0
    for i in range(1, splits + 1):
        cut = len(stream) * i // (splits + 1)
        if cut > prev:
            chunks.append(stream[prev:cut])
            prev = cut
    chunks.append(stream[prev:])
    check_stream(ENV, chunks)


if __name__ == "__main__":
    run(test_one_input)
