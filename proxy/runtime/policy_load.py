"""Policy bytes -> CompiledPolicy for the sidecar's two policy sources, a watched file and a
control plane bundle (DESIGN rule 5: one loader, every problem with its path).

Rules:
- `config.compile_policy_bytes` reads and compiles (the one policy reader of the project); problems
  raise `ConfigError` naming `source`.
- Both sources load beside live traffic in a worker thread, so the whole load runs inside
  `runtime.gcquiet.gc_paused` (collector paused, new objects joined to the oldest generation
  unscanned, short GIL switch interval); the JSON decoder reads a large document in pieces
  (`config._strict_json`), and the State a reload replaces is freed off the loop
  (`gcquiet.release_in_background`, called by `runtime.server.Worker.apply`).
"""

from __future__ import annotations

from proxy.config import compile_policy_bytes
from proxy.core.policy import CompiledPolicy
from proxy.runtime.gcquiet import gc_paused


def load_policy(data: bytes, *, source: str, revision: str, trust_domains: frozenset[str],
                stamp_revision: bool = False) -> CompiledPolicy:
    """`config.compile_policy_bytes` inside `gcquiet.gc_paused`."""
    with gc_paused():
        return compile_policy_bytes(data, source=source, revision=revision,
                                    trust_domains=trust_domains, stamp_revision=stamp_revision)
