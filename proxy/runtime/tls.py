"""TLS for the data listener: server contexts, hot swap on rotation, peer chain extraction.

Rules:
- TLS 1.2 minimum (configurable to 1.3), client certificate REQUIRED; OpenSSL checks the chain
  against the union of all trust bundles (a coarse gate). The precise per-trust-domain check of
  the X.509-SVID rules is `core.spiffe.verify_peer`, on the chain extracted here.
- Session resumption is disabled (no TLS 1.2 session tickets, no TLS 1.3 tickets): a resumed
  session carries no peer chain, so every connection must do a full handshake with a certificate.
  A resumed session that slips through yields an empty chain, which the core rejects (fail closed).
- Rotation: a listener keeps one "dispatch" context whose servername callback (called by OpenSSL
  for every ClientHello, with or without SNI) switches the connection to the current context. New
  handshakes use new material at once; live connections keep theirs.
- Private key bytes are written only to a 0600 file in a 0700 private directory for the moment
  OpenSSL loads them (the `ssl` module loads keys from files only), then removed.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any

from proxy.core.spiffe import OwnSvid, TrustStore

try:  # Python 3.13+: public API returning DER bytes
    _PUBLIC_CHAIN_API = hasattr(ssl.SSLObject, "get_unverified_chain")
    import _ssl

    _DER = _ssl.ENCODING_DER
except ImportError:  # pragma: no cover
    _PUBLIC_CHAIN_API = False
    _DER = 2

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


def peer_chain_der(transport: Any) -> tuple[bytes, ...]:
    """The certificate chain the peer presented (leaf first, DER); () when there is none."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return ()
    if _PUBLIC_CHAIN_API:
        chain = sslobj.get_unverified_chain() or []
        return tuple(c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain)
    inner = getattr(sslobj, "_sslobj", None)
    if inner is None or not hasattr(inner, "get_unverified_chain"):
        leaf = sslobj.getpeercert(binary_form=True)
        return (leaf,) if leaf else ()
    chain = inner.get_unverified_chain() or []
    return tuple(c.public_bytes(_DER) for c in chain)


def server_context(own: OwnSvid, trust: TrustStore, *, min_version: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.num_tickets = 0
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_verify_locations(cadata=trust.roots_pem())
    load_key_pair(ctx, own.cert_chain_pem, own.key_pem)
    return ctx


def client_context(own: OwnSvid | None, trust: TrustStore) -> ssl.SSLContext:
    """An mTLS client context (used by tools, tests and the control plane client)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE authenticates by URI SAN, not by host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trust.roots_pem())
    if own is not None:
        load_key_pair(ctx, own.cert_chain_pem, own.key_pem)
    return ctx


def load_key_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="portcullis-tls-") as d:
        os.chmod(d, 0o700)
        cert_path = os.path.join(d, "cert.pem")
        key_path = os.path.join(d, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)


class TlsSwitch:
    """The listener's fixed SSLContext that hands every new handshake the current context."""

    def __init__(self, initial: ssl.SSLContext) -> None:
        self.current = initial
        self.dispatch = initial
        self.generation = 1
        initial.sni_callback = self._select

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self.current
        if sslobj.context is not current:
            sslobj.context = current
        return None

    def swap(self, new: ssl.SSLContext) -> None:
        new.sni_callback = self._select
        self.current = new
        self.generation += 1
