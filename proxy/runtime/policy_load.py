"""Policy bytes -> CompiledPolicy for the sidecar's two policy sources, a watched file and a
control plane bundle (DESIGN rule 5: one loader, every problem with its path).

Rules:
- The document is read by `config.policy_document` (UTF-8, bounded YAML, JSON read as JSON) and
  compiled by `core.policy.compile_policy`; problems raise `ConfigError` naming `source`.
- Both run beside live traffic in a worker thread, so the whole load runs with the cyclic GC
  paused (`runtime.gcquiet`).
- `stamp_revision`: the document's own `revision` is replaced by `revision` (a bundle's revision
  is the one every audit record names); otherwise `revision` is used only when the document has
  none.
"""

from __future__ import annotations

from proxy.config import policy_document
from proxy.core.policy import CompiledPolicy, compile_policy
from proxy.runtime.gcquiet import gc_paused


def load_policy(data: bytes, *, source: str, revision: str, trust_domains: frozenset[str],
                stamp_revision: bool = False) -> CompiledPolicy:
    with gc_paused():
        doc = policy_document(data, source=source)
        if stamp_revision and isinstance(doc, dict):
            doc = {**doc, "revision": revision}
        return compile_policy(doc, source=source, revision=revision,
                              known_trust_domains=trust_domains)
