"""Policy bytes -> CompiledPolicy for the sidecar's two policy sources, a watched file and a
control plane bundle (DESIGN rule 5: one loader, every problem with its path).

Rules:
- `config.compile_policy_bytes` reads and compiles (the one policy reader of the project); problems
  raise `ConfigError` naming `source`.
- Both sources load beside live traffic in a worker thread, so the whole load runs with the
  cyclic GC paused (`runtime.gcquiet`).
"""

from __future__ import annotations

from proxy.config import compile_policy_bytes
from proxy.core.policy import CompiledPolicy
from proxy.runtime.gcquiet import gc_paused


def load_policy(data: bytes, *, source: str, revision: str, trust_domains: frozenset[str],
                stamp_revision: bool = False) -> CompiledPolicy:
    """`config.compile_policy_bytes` with the cyclic GC paused."""
    with gc_paused():
        return compile_policy_bytes(data, source=source, revision=revision,
                                    trust_domains=trust_domains, stamp_revision=stamp_revision)
