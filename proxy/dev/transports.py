"""Stand-ins for what a TLS transport tells the listener, for in-process harnesses (the hypothesis
and atheris HTTP harnesses, bench/bench_exchange.py) that drive a real `ClientConnection` without
sockets. Never used by the sidecar itself.

`PresentedChain(chain_der)` is what `runtime.tls.peer_chain_der` reads from the transport's
`ssl_object` extra: the certificates the client presented, through both the public
`get_unverified_chain()` of Python 3.13 and the private `_sslobj` route of older versions.
"""

from __future__ import annotations


class _Der:
    __slots__ = ("der",)

    def __init__(self, der: bytes) -> None:
        self.der = der

    def public_bytes(self, _encoding) -> bytes:
        return self.der


class PresentedChain:
    def __init__(self, chain_der: list[bytes]) -> None:
        self._chain = [_Der(d) for d in chain_der]
        self._sslobj = self

    def get_unverified_chain(self):
        return self._chain
