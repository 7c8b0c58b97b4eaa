"""The local policy: compile a policy document once at load, evaluate it per request.

- `compile_policy(doc, *, source, revision, known_trust_domains) -> CompiledPolicy` validates the
  whole document and raises one `ConfigError` listing every problem with its key path
  (DESIGN rule 5); see `compiler` for the document format (version 1).
- `evaluate(policy, ctx) -> Verdict` is pure, indexed and default-deny; see `evaluator` for the
  semantics (deny overrides allow, first rule in file order names the decision, shadow rules).
"""

from proxy.core.policy.compiler import compile_policy
from proxy.core.policy.evaluator import NO_MATCH, evaluate, evaluate_linear
from proxy.core.policy.model import (
    CompiledPolicy,
    CompiledRule,
    PathTemplate,
    Route,
    WorkloadPattern,
)

__all__ = [
    "NO_MATCH",
    "CompiledPolicy",
    "CompiledRule",
    "PathTemplate",
    "Route",
    "WorkloadPattern",
    "compile_policy",
    "evaluate",
    "evaluate_linear",
]
