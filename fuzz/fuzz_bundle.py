"""Policy bundles: any tar.gz bytes read to a Bundle or a BundleError; whatever is read is verified
against a key that signed none of the inputs, so nothing the fuzzer makes may ever be accepted."""

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.bundles.io import read_targz_bytes
    from proxy.core import bundle as B
    from proxy.errors import BundleError

from common import run

KEY = Ed25519PrivateKey.generate().public_key()  # a fresh key: no input was signed with it


def test_one_input(data: bytes) -> None:
    for parse in (B.parse_manifest, B.parse_signature, B.parse_revocations):
        try:
            parse(data)
        except BundleError:
            pass
    try:
        bundle = read_targz_bytes(data)
    except BundleError:
        return
    try:
        B.verify(bundle, public_keys=[KEY], require_signature=True, now=1_800_000_000.0,
                 active_revision=None)
    except BundleError:
        return
    raise AssertionError("a bundle no trusted key signed was accepted")


if __name__ == "__main__":
    run(test_one_input)
