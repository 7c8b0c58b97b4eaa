"""Benchmark: median `proxy.core.policy.evaluate` time at 10, 1,000 and 10,000 generated rules.

Usage: python bench/bench_policy.py [--seed N] [--rounds N] [--requests N]

Prints one line per size (median and p90 microseconds per evaluate() call over all requests, the
median over identical requests, the median over the token-bearing requests alone, the median
over the CEL requests alone, the median of `authentication_for` and of `action_for`, compile
time) and the ratio 10,000 / 10 of the medians. The targets set by
the performance issue: <= 20 us median at 1,000 rules and a ratio <= 1.5. It also reports how many
sampled requests `evaluate` and the rule-by-rule reference `evaluate_linear` agree on. A script:
no asserts, results are printed.

Generated policy (a realistic mix): services grouped in namespaces; each service gets an allow
rule for its own SPIFFE ID (sometimes two callers) with exact paths, `{id}` templates and a `**`
subtree; every namespace has a wildcard-caller rule (`spiffe://example.org/ns/<ns>/sa/*`) on a
health route; every 25th rule is a deny on an admin subtree; every 50th is a shadow rule; one
partner trust domain rule uses `spiffe://partner.org/**`. Token rules: every 10th service is an
expense-style agent rule (workload + subjects + actors + claims, `peer_is: actor`,
`max_delegation_depth`, `authorization_details` with match and bounds), the next one its MFA
variant (`acr_values`, `max_auth_age_s`, literal bounds: step-up), and the one after a
token-only rule without workloads (subjects + scopes; it lands in the "any workload" set). The
`authentication` section has one DPoP entry per agent service plus a `**` default entry.
CEL: every 10th service (i % 10 == 6) has an action `svcN.expense.submit` (POST
/svcN/expenses/{expense_id}, a body `amount`, a query `department`) and an allow rule naming it
with a CEL `when` (`action.params.amount <= 5000.0 && action.params.department ==
token.claims.department`); its requests (a separate set, `cel_us`, not in the main mix so the
headline stays comparable with earlier runs) carry the action and its extracted parameters as
the pipeline would, 70% allowed, 30% not (over the limit, another department, another caller).
Requests: 70% that match some rule, 30% that do not (unknown caller, unknown path, wrong method);
requests for token rules carry a verified-token `TokenClaims` and a query (`amount=...`), with the
same 70/30 split (over the limit, another invoice, weak acr, another agent's token). Identical in
shape at every size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from types import MappingProxyType  # noqa: E402

from proxy.core.model import Actor, RequestContext, TokenClaims  # noqa: E402
from proxy.core.policy import (  # noqa: E402
    compile_policy,
    evaluate,
    evaluate_linear,
    extract_params,
)
from proxy.core.spiffe import parse_spiffe_id  # noqa: E402

SIZES = (10, 1_000, 10_000)
SERVICES_PER_NAMESPACE = 20
IDP = "https://idp.example.org"
NOW = 1_800_000_000.0


def _agent(svc: str) -> str:
    return f"spiffe://example.org/agents/{svc}"


def _details(amount_rhs: object, extra: dict | None = None) -> dict:
    return {"authorization_details": {
        "type": "invoice_approval",
        "match": {"invoice_id": "invoice_id"},
        "bounds": {"amount": amount_rhs},
    }, **(extra or {})}


def generate_policy(n_rules: int, rng: random.Random) -> dict:
    rules = []
    i = 0
    while len(rules) < n_rules:
        ns = f"ns{i // SERVICES_PER_NAMESPACE}"
        svc = f"svc{i}"
        caller = f"spiffe://example.org/ns/{ns}/sa/{svc}"
        kind = i % 50
        if i % SERVICES_PER_NAMESPACE == 0:
            rules.append({
                "id": f"{ns}-health",
                "effect": "allow",
                "from": {"workloads": [f"spiffe://example.org/ns/{ns}/sa/*"]},
                "to": [{"methods": ["GET"], "paths": [f"/{ns}/health"]}],
            })
        elif kind == 25:
            rules.append({
                "id": f"{svc}-no-admin",
                "effect": "deny",
                "from": {"workloads": [caller, f"spiffe://example.org/ns/{ns}/sa/batch"]},
                "to": [{"paths": [f"/{svc}/admin/**"]}],
            })
        elif kind == 49:
            rules.append({
                "id": f"{svc}-trial",
                "effect": "allow",
                "shadow": True,
                "from": {"workloads": [caller]},
                "to": [{"methods": ["POST"], "paths": [f"/{svc}/items"]}],
            })
        elif i % 10 in (3, 4) and i % SERVICES_PER_NAMESPACE != 0:
            agent = _agent(f"svc{i - i % 10 + 3}")
            large = i % 10 == 4
            rules.append({
                "id": f"{svc}-agent-approves" + ("-large" if large else ""),
                "effect": "allow",
                "from": {"workloads": [agent], "subjects": [{"issuer": IDP, "sub": "*"}],
                         "actors": [agent], "claims": {"department": "finance"}},
                "to": [{"methods": ["POST"],
                        "paths": [f"/svc{i - i % 10 + 3}/invoices/{{invoice_id}}/approve"]}],
                "require": ({"peer_is": "actor", "max_delegation_depth": 1,
                             **_details({"gt": 5000, "le": ["max_amount", 10000]},
                                        {"acr_values": ["urn:example:mfa"],
                                         "max_auth_age_s": 900})}
                            if large else
                            {"peer_is": "actor", "max_delegation_depth": 1,
                             **_details({"gt": 0, "le": ["max_amount", 5000]})}),
            })
        elif i % 10 == 6 and i % SERVICES_PER_NAMESPACE != 0:
            rules.append({
                "id": f"{svc}-expense-submit",
                "effect": "allow",
                "from": {"workloads": [caller]},
                "to": [{"actions": [f"{svc}.expense.submit"]}],
                "when": "action.params.amount <= 5000.0 && "
                        "action.params.department == token.claims.department",
            })
        elif i % 10 == 5:
            rules.append({
                "id": f"{svc}-reports",
                "effect": "allow",
                "from": {"subjects": [{"issuer": IDP, "sub": f"user{i}"}],
                         "scopes": ["reports:read"]},
                "to": [{"methods": ["GET"], "paths": [f"/{svc}/reports/**"]}],
            })
        elif i == 7:
            rules.append({
                "id": "partner",
                "effect": "allow",
                "from": {"workloads": ["spiffe://partner.org/**"]},
                "to": [{"methods": ["GET"], "paths": ["/partner/**"]}],
            })
        else:
            callers = [caller]
            if rng.random() < 0.3:
                callers.append(f"spiffe://example.org/ns/{ns}/sa/svc{i + 1}")
            rules.append({
                "id": f"{svc}-api",
                "effect": "allow",
                "from": {"workloads": callers},
                "to": [
                    {"methods": ["GET", "HEAD"],
                     "paths": [f"/{svc}/items", f"/{svc}/items/{{id}}", f"/{svc}/static/**"]},
                    {"methods": ["POST", "PUT"], "paths": [f"/{svc}/items/{{id}}/parts/*"]},
                ],
            })
        i += 1
    rules = rules[:n_rules]
    authentication = [
        {"methods": ["POST"], "paths": ["/".join(r["to"][0]["paths"][0].split("/")[:3]) + "/**"],
         "token": "required", "binding": "dpop"}
        for r in rules if r["id"].endswith("-agent-approves")
    ]
    authentication.append({"paths": ["/**"], "token": "optional", "binding": "any"})
    actions = [
        {"name": r["to"][0]["actions"][0], "methods": ["POST"],
         "paths": [f"/{r['id'][:-len('-expense-submit')]}/expenses/{{expense_id}}"],
         "params": {"expense_id": {"from": "path"},
                    "amount": {"from": "body", "pointer": "/amount", "type": "number"},
                    "department": {"from": "query", "type": "string"}}}
        for r in rules if r["id"].endswith("-expense-submit")
    ]
    doc = {"version": 1, "revision": f"bench-{n_rules}", "authentication": authentication,
           "rules": rules}
    if actions:
        doc["actions"] = actions
    return doc


def _token(sub: str, actors: tuple[str, ...] = (), acr: str = "urn:example:pwd",
           details: tuple = (), scopes: frozenset[str] = frozenset()) -> TokenClaims:
    return TokenClaims(
        issuer=IDP, subject=sub, audience=("https://api.example.org",),
        expires_at=int(NOW) + 300, fingerprint="00" * 32, client_id="expense-app", scopes=scopes,
        actors=tuple(Actor(sub=a) for a in actors), acr=acr, amr=("pwd",),
        auth_time=int(NOW) - 60, authorization_details=details,
        claims=MappingProxyType({"iss": IDP, "sub": sub, "department": "finance"}))


def _token_request(rule: dict, rng: random.Random) -> RequestContext:
    """A token-bearing request for an agent or reports rule (70% would be allowed or stepped
    up, 30% not)."""
    roll = rng.random()
    if rule["id"].endswith("-reports"):
        user = rule["from"]["subjects"][0]["sub"]
        svc = rule["id"][:-len("-reports")]
        tok = _token(user if roll >= 0.3 else "mallory", scopes=frozenset({"reports:read"}))
        return _ctx(f"spiffe://example.org/ns/x/sa/{svc}", "GET", f"/{svc}/reports/q1/summary",
                    token=tok)
    agent = rule["from"]["workloads"][0]
    template = rule["to"][0]["paths"][0]
    large = rule["id"].endswith("-large")
    invoice = f"INV-{rng.randrange(10_000)}"
    amount = rng.choice([7500, 9000]) if large else rng.choice([120, 4800])
    acr = "urn:example:mfa" if large and rng.random() < 0.5 else "urn:example:pwd"
    details = (MappingProxyType({"type": "invoice_approval", "invoice_id": invoice,
                                 "max_amount": 10000}),)
    actors: tuple[str, ...] = (agent,)
    if roll < 0.1:
        amount = 999_999
    elif roll < 0.2:
        invoice = "INV-other"
    elif roll < 0.3:
        actors = ("spiffe://example.org/agents/other",)
    return _ctx(agent, "POST", template.replace("{invoice_id}", invoice), f"amount={amount}",
                _token("alice", actors, acr, details))


def _ctx(workload: str, method: str, path: str, query: str = "",
         token: TokenClaims | None = None, action: str | None = None,
         params: object = MappingProxyType({})) -> RequestContext:
    sid = parse_spiffe_id(workload)
    return RequestContext(workload=sid, workload_uri=str(sid), method=method, path=path,
                          query=query, token=token, action=action, params=params)


def generate_cel_requests(policy, rules: list[dict], count: int,
                          rng: random.Random) -> list[RequestContext]:
    """Requests for the CEL rules, with the action and parameters the pipeline would extract."""
    cel_rules = [r for r in rules if "when" in r]
    out: list[RequestContext] = []
    if not cel_rules:
        return out
    for _ in range(count):
        rule = rng.choice(cel_rules)
        caller = rule["from"]["workloads"][0]
        svc = rule["id"][:-len("-expense-submit")]
        path = f"/{svc}/expenses/E-{rng.randrange(10_000)}"
        amount, department = rng.choice(["120.50", "4800"]), "finance"
        roll = rng.random()
        if roll < 0.1:
            amount = "999999"
        elif roll < 0.2:
            department = "sales"
        elif roll < 0.3:
            caller = "spiffe://example.org/ns/unknown/sa/stranger"
        spec = policy.action_for("POST", path)
        query = f"department={department}"
        params = extract_params(spec, spec.captures(path), query,
                                f'{{"amount": {amount}}}'.encode())
        tok = _token("alice")
        out.append(_ctx(caller, "POST", path, query, tok, spec.name, params))
    return out


def generate_requests(rules: list[dict], count: int, rng: random.Random) -> list[RequestContext]:
    out = []
    for _ in range(count):
        rule = rng.choice(rules)
        if "when" in rule:
            rule = rng.choice([r for r in rules if "when" not in r])
        if "require" in rule or "workloads" not in rule["from"]:
            out.append(_token_request(rule, rng))
            continue
        wl = rule["from"]["workloads"][0].replace("**", "a/b").replace("*", "svcx")
        route = rule["to"][0]
        method = (route.get("methods") or ["GET"])[0]
        path = (route["paths"][-1].replace("{id}", "42").replace("**", "css/site.css")
                .replace("*", "p1"))
        roll = rng.random()
        if roll < 0.1:
            wl = "spiffe://example.org/ns/unknown/sa/stranger"
        elif roll < 0.2:
            path = "/nowhere/at/all"
        elif roll < 0.3:
            method = "DELETE"
        out.append(_ctx(wl, method, path))
    return out


def measure_once(policy, requests: list[RequestContext]) -> float:
    """Mean microseconds per evaluate() call over one pass of all requests."""
    ev = evaluate
    now = NOW
    t0 = time.perf_counter_ns()
    for c in requests:
        ev(policy, c, now=now)
    return (time.perf_counter_ns() - t0) / len(requests) / 1000


def measure_auth_once(policy, requests: list[RequestContext]) -> float:
    """Mean microseconds per authentication_for() call over one pass of all requests."""
    af = policy.authentication_for
    t0 = time.perf_counter_ns()
    for c in requests:
        af(c.method, c.path)
    return (time.perf_counter_ns() - t0) / len(requests) / 1000


def measure_action_once(policy, requests: list[RequestContext]) -> float:
    """Mean microseconds per action_for() call over one pass of all requests."""
    af = policy.action_for
    t0 = time.perf_counter_ns()
    for c in requests:
        af(c.method, c.path)
    return (time.perf_counter_ns() - t0) / len(requests) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()

    setups = {}
    for n in SIZES:
        rng = random.Random(args.seed)
        doc = generate_policy(n, rng)
        t0 = time.perf_counter()
        policy = compile_policy(doc)
        compile_ms = (time.perf_counter() - t0) * 1000
        requests = generate_requests(doc["rules"], args.requests, rng)
        tokened = [c for c in requests if c.token is not None]
        cel_requests = generate_cel_requests(policy, doc["rules"], args.requests // 5, rng)
        sample = requests[:100] + tokened[:100] + cel_requests[:100]
        agree = sum(evaluate(policy, c, now=NOW) == evaluate_linear(policy, c, now=NOW)
                    for c in sample)
        effects: dict[str, int] = {}
        for c in tokened:
            e = evaluate(policy, c, now=NOW).outcome.effect
            effects[e] = effects.get(e, 0) + 1
        # The first rules are the same at every size (same seed), so requests drawn from them
        # are identical across sizes: this isolates the cost of the rule count itself.
        same = generate_requests(doc["rules"][:SIZES[0]], args.requests,
                                 random.Random(args.seed + 1))
        cel_effects: dict[str, int] = {}
        for c in cel_requests:
            e = evaluate(policy, c, now=NOW).outcome.effect
            cel_effects[e] = cel_effects.get(e, 0) + 1
        setups[n] = (policy, requests, same, tokened, compile_ms, agree, len(sample), effects,
                     cel_requests, cel_effects)
        for _ in range(5):  # warm-up
            measure_once(policy, requests)

    # Sizes are measured round-robin so that background load affects all of them alike.
    samples: dict[int, list[float]] = {n: [] for n in SIZES}
    same_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    token_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    auth_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    cel_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    action_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.rounds):
        for n in SIZES:
            policy, requests, same, tokened = setups[n][:4]
            cel_requests = setups[n][8]
            samples[n].append(measure_once(policy, requests))
            same_samples[n].append(measure_once(policy, same))
            token_samples[n].append(measure_once(policy, tokened))
            auth_samples[n].append(measure_auth_once(policy, requests))
            if cel_requests:
                cel_samples[n].append(measure_once(policy, cel_requests))
            action_samples[n].append(measure_action_once(policy, requests))

    medians, same_medians, token_medians = {}, {}, {}
    print("median_us: requests spread over the whole policy; same_req_us: identical requests "
          f"(drawn from the first {SIZES[0]} rules) at every size; token_us: the token-bearing "
          "requests alone; cel_us: the CEL-condition requests alone; auth_us: "
          "authentication_for(); action_us: action_for()")
    print(f"{'rules':>7} {'median_us':>10} {'p90_us':>8} {'same_req_us':>12} {'token_us':>9} "
          f"{'cel_us':>7} {'auth_us':>8} {'action_us':>10} {'compile_ms':>11} {'agree':>9}  "
          "token outcomes; CEL outcomes")
    for n in SIZES:
        _p, _r, _s, tokened, compile_ms, agree, total, effects, cel_reqs, cel_eff = setups[n]
        med = statistics.median(samples[n])
        p90 = statistics.quantiles(samples[n], n=10)[-1]
        medians[n] = med
        same_medians[n] = statistics.median(same_samples[n])
        token_medians[n] = statistics.median(token_samples[n])
        auth = statistics.median(auth_samples[n])
        act = statistics.median(action_samples[n])
        cel_med = statistics.median(cel_samples[n]) if cel_samples[n] else float("nan")
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(effects.items()))
        cel_out = " ".join(f"{k}={v}" for k, v in sorted(cel_eff.items()))
        print(f"{n:>7} {med:>10.2f} {p90:>8.2f} {same_medians[n]:>12.2f} "
              f"{token_medians[n]:>9.2f} {cel_med:>7.2f} {auth:>8.2f} {act:>10.2f} "
              f"{compile_ms:>11.1f} {agree:>5}/{total}  {len(tokened)} requests: {outcomes}; "
              f"{len(cel_reqs)} requests: {cel_out}")
    big, small = SIZES[-1], SIZES[0]
    print(f"ratio {big}/{small}: {medians[big] / medians[small]:.2f} spread requests, "
          f"{same_medians[big] / same_medians[small]:.2f} identical requests, "
          f"{token_medians[big] / token_medians[small]:.2f} token requests (target <= 1.5); "
          f"median at 1,000 rules: {medians[1_000]:.2f} us (target <= 20)")


if __name__ == "__main__":
    main()
