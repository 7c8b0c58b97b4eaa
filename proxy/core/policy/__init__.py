"""The local policy: compile a policy document once at load, evaluate it per request.

- `compile_policy(doc, *, source, revision, known_trust_domains) -> CompiledPolicy` validates the
  whole document and raises one `ConfigError` listing every problem with its key path
  (DESIGN rule 5); see `compiler` for the document format (version 1).
- `evaluate(policy, ctx, *, now=None) -> Verdict` is pure, indexed and default-deny; see
  `evaluator` for the semantics (deny overrides allow, allow overrides step-up, first rule in file
  order names the decision, shadow rules, CEL `when` conditions that fail closed).
- `explain(policy, ctx, *, now=None) -> Explanation`: the same decision with a per-rule trace
  (`explain`), for `portcullis policy explain` and tests; never on the request path.
- `CompiledPolicy.authentication_for(method, path) -> AuthRequirement`: what the route needs of
  the token and its binding before any token is verified (first matching `authentication` entry,
  else token optional / binding any).
- `CompiledPolicy.action_for(method, path) -> ActionSpec | None` and
  `extract_params(spec, spec.captures(path), query, body, content_type=...)`: the policy action a
  request is and its typed parameters (`actions`), for `RequestContext.action` / `.params`.
"""

from proxy.core.policy.actions import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    ActionSpec,
    ParamSpec,
    extract_params,
)
from proxy.core.policy.compiler import STEP_UP_CODE, compile_policy
from proxy.core.policy.evaluator import NO_MATCH, evaluate, evaluate_linear
from proxy.core.policy.explain import Check, Explanation, RuleTrace, explain
from proxy.core.policy.model import (
    DEFAULT_AUTH,
    AuthEntry,
    AuthRequirement,
    CompiledPolicy,
    CompiledRule,
    PathTemplate,
    Route,
    WorkloadPattern,
)

__all__ = [
    "DEFAULT_AUTH",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "NO_MATCH",
    "STEP_UP_CODE",
    "ActionSpec",
    "AuthEntry",
    "AuthRequirement",
    "Check",
    "CompiledPolicy",
    "CompiledRule",
    "Explanation",
    "ParamSpec",
    "PathTemplate",
    "Route",
    "RuleTrace",
    "WorkloadPattern",
    "compile_policy",
    "evaluate",
    "evaluate_linear",
    "explain",
    "extract_params",
]
