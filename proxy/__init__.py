"""Portcullis: an identity-aware mTLS sidecar (Policy Enforcement Point).

`proxy.core` decides (sans-IO, pure, takes `now`); `proxy.runtime` moves bytes.
See ../shared/DESIGN.md for the architecture and its six rules.
"""

__version__ = "0.1.0"
