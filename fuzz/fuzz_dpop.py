"""DPoP header lists: any list of values, and correctly signed proofs with arbitrary members,
give a verified proof or a DPoPError / 503 (full replay store), never anything else."""

import json
import time

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.core.dpop import DPoPConfig, verify_dpop_proof
    from proxy.core.replay import MemoryReplayStore
    from proxy.errors import DPoPError, ServiceUnavailable

from common import run
from tests.dpop_factory import ProofKey, make_proof

CFG = DPoPConfig(frozenset({"ES256", "EdDSA"}))
HTU = "https://api.example.com/orders/1"
KEY = ProofKey.generate("ES256")


def _json_object(text: str):
    try:
        v = json.loads(text)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {"x": v}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    now = time.time()
    token = "tok" if fdp.ConsumeBool() else None
    if fdp.ConsumeBool():
        values = [fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 600))
                  for _ in range(fdp.ConsumeIntInRange(0, 3))]
    else:
        claims = _json_object(fdp.ConsumeUnicodeNoSurrogates(200))
        header = _json_object(fdp.ConsumeUnicodeNoSurrogates(200))
        try:
            values = [make_proof(KEY, htu=HTU, iat=int(now), access_token=token, claims=claims,
                                 header=header)]
        except (TypeError, ValueError):
            return
    try:
        verify_dpop_proof(values, method="GET", htu=HTU, access_token=token, config=CFG,
                          replay=MemoryReplayStore(100), now=now,
                          nonce_check=lambda n: n == "good", current_nonce=lambda: "good")
    except (DPoPError, ServiceUnavailable):
        pass


if __name__ == "__main__":
    run(test_one_input)
