"""Benchmark: median `proxy.core.policy.evaluate` time at 10, 1,000 and 10,000 generated rules.

Usage: python bench/bench_policy.py [--seed N] [--rounds N]

Prints one line per size (median and p90 microseconds per evaluate() call, compile time) and the
ratio 10,000 / 10 of the medians. The target set by the performance issue: <= 20 us median at
1,000 rules and a ratio <= 1.5. It also reports how many sampled requests `evaluate` and the
rule-by-rule reference `evaluate_linear` agree on. A script: no asserts, results are printed.

Generated policy (a realistic mix): services grouped in namespaces; each service gets an allow
rule for its own SPIFFE ID (sometimes two callers) with exact paths, `{id}` templates and a `**`
subtree; every namespace has a wildcard-caller rule (`spiffe://example.org/ns/<ns>/sa/*`) on a
health route; every 25th rule is a deny on an admin subtree; every 50th is a shadow rule; one
partner trust domain rule uses `spiffe://partner.org/**`. Requests: 70% that match some rule,
30% that do not (unknown caller, unknown path, wrong method), identical in shape at every size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.core.model import RequestContext  # noqa: E402
from proxy.core.policy import compile_policy, evaluate, evaluate_linear  # noqa: E402
from proxy.core.spiffe import parse_spiffe_id  # noqa: E402

SIZES = (10, 1_000, 10_000)
SERVICES_PER_NAMESPACE = 20


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
    return {"version": 1, "revision": f"bench-{n_rules}", "rules": rules[:n_rules]}


def _ctx(workload: str, method: str, path: str) -> RequestContext:
    sid = parse_spiffe_id(workload)
    return RequestContext(workload=sid, workload_uri=str(sid), method=method, path=path)


def generate_requests(rules: list[dict], count: int, rng: random.Random) -> list[RequestContext]:
    out = []
    for _ in range(count):
        rule = rng.choice(rules)
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
    t0 = time.perf_counter_ns()
    for c in requests:
        ev(policy, c)
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
        sample = requests[:100]
        agree = sum(evaluate(policy, c) == evaluate_linear(policy, c) for c in sample)
        # The first rules are the same at every size (same seed), so requests drawn from them
        # are identical across sizes: this isolates the cost of the rule count itself.
        same = generate_requests(doc["rules"][:SIZES[0]], args.requests,
                                 random.Random(args.seed + 1))
        setups[n] = (policy, requests, same, compile_ms, agree, len(sample))
        for _ in range(5):  # warm-up
            measure_once(policy, requests)

    # Sizes are measured round-robin so that background load affects all of them alike.
    samples: dict[int, list[float]] = {n: [] for n in SIZES}
    same_samples: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.rounds):
        for n in SIZES:
            samples[n].append(measure_once(setups[n][0], setups[n][1]))
            same_samples[n].append(measure_once(setups[n][0], setups[n][2]))

    medians, same_medians = {}, {}
    print("median_us: requests spread over the whole policy; same_req_us: identical requests "
          f"(drawn from the first {SIZES[0]} rules) at every size")
    print(f"{'rules':>7} {'median_us':>10} {'p90_us':>8} {'same_req_us':>12} {'compile_ms':>11} "
          f"{'agree':>9}")
    for n in SIZES:
        _policy, _requests, _same, compile_ms, agree, total = setups[n]
        med = statistics.median(samples[n])
        p90 = statistics.quantiles(samples[n], n=10)[-1]
        medians[n] = med
        same_medians[n] = statistics.median(same_samples[n])
        print(f"{n:>7} {med:>10.2f} {p90:>8.2f} {same_medians[n]:>12.2f} {compile_ms:>11.1f} "
              f"{agree:>5}/{total}")
    big, small = SIZES[-1], SIZES[0]
    print(f"ratio {big}/{small}: {medians[big] / medians[small]:.2f} spread requests, "
          f"{same_medians[big] / same_medians[small]:.2f} identical requests (target <= 1.5); "
          f"median at 1,000 rules: {medians[1_000]:.2f} us (target <= 20)")


if __name__ == "__main__":
    main()
