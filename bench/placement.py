"""Router policy vs round-robin over feasible pools, on the example fleet, side by side in one run.

A discrete-event queueing simulation: the placement and routing code are imageserve's own
(``serve_app.domain.placement.place`` and ``serve_app.domain.routing.RoutingTable``), service times are the
planner's per-image estimates for each (variant, GPU class) with +-20% noise, arrivals are Poisson
with a mixed workload. Tiny CPU models cannot show GPU speed differences, so this is how the policy's
effect is measured here; a GPU fleet measures it for real. Prints mean and p95 completion time per
policy and load, and their ratio.

    .venv/bin/python -m bench.placement [--requests 4000] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import sys

from serve_app.domain.config import load_fleet, parse_config
from serve_app.domain.placement import place
from serve_app.domain.routing import Route, RoutingTable
from serve_app.examples import EXAMPLE_FLEET

FLEET = EXAMPLE_FLEET
# (task, requested model, share of traffic)
WORKLOAD = [
    ("generate", "z-image-turbo", 0.45),
    ("edit", "qwen-image-edit", 0.35),
    ("edit", "qwen-image-edit-2509-svdq-int4-r128-lightning-4step", 0.10),
    ("generate", "z-image-turbo-svdq-int4-r128", 0.10),
]


def build_table(gpus_per_replica: int = 1):
    fleet = load_fleet(FLEET)
    models = {m for _, m, _ in WORKLOAD} | {
        "qwen-image-edit-2511", "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step", "z-image-turbo-svdq-fp4-r32"}
    config = fleet.serve_with(parse_config({"models": {m: {} for m in models if m not in ("qwen-image-edit",)}}))
    placements, _ = place(config)
    routes: dict[str, list[Route]] = {}
    replicas: dict[str, int] = {}
    per_pool: dict[str, int] = {}
    for p in placements:
        per_pool[p.pool.name] = per_pool.get(p.pool.name, 0) + 1
    for p in placements:
        name = f"{p.variant.id}@{p.pool.name}"
        routes.setdefault(p.variant.id, []).append(Route(
            pool=p.pool.name, gpu_class=p.gpu.id, deployment=name, vram_gib=p.gpu.vram_gib,
            cost_s=p.seconds_per_image))
        # The pool's GPUs shared evenly among the variants placed on it.
        pool = fleet.pool(p.pool.name)
        gpus = pool.nodes * pool.gpus_per_node
        replicas[name] = max(1, gpus // per_pool[p.pool.name] // gpus_per_replica)
    return RoutingTable(config.build_catalog(), routes, {}), replicas


def simulate(policy: str, rate: float, requests: int, seed: int) -> list[float]:
    table, replicas = build_table()
    table.replicas = replicas
    rng = random.Random(seed)
    round_robin = {name: itertools.cycle(range(16)) for _, name, _ in WORKLOAD}
    free_at: dict[str, list[float]] = {name: [0.0] * n for name, n in replicas.items()}
    done_events: list[tuple[float, str]] = []
    latencies = []
    now = 0.0
    names = [(t, m) for t, m, _ in WORKLOAD]
    weights = [w for _, _, w in WORKLOAD]
    for _ in range(requests):
        now += rng.expovariate(rate)
        while done_events and done_events[0][0] <= now:
            _, finished = heapq.heappop(done_events)
            table.outstanding[finished] -= 1
        task, model = rng.choices(names, weights)[0]
        options = table.options(table.resolve(model, task))
        if policy == "router":
            _, route = table.choose(options)
        else:
            _, route = options[next(round_robin[model]) % len(options)]
        service = route.cost_s * rng.uniform(0.8, 1.2)
        servers = free_at[route.deployment]
        i = min(range(len(servers)), key=servers.__getitem__)
        start = max(now, servers[i])
        servers[i] = start + service
        table.outstanding[route.deployment] += 1
        heapq.heappush(done_events, (servers[i], route.deployment))
        latencies.append(servers[i] - now)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"mean_s": round(sum(ordered) / len(ordered), 2), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", default="0.5,1.0,1.5", help="arrivals per second to compare at")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"workload": {m: w for _, m, w in WORKLOAD}, "fleet": str(FLEET.name), "loads": {}}
    for rate in (float(r) for r in args.rates.split(",")):
        router = summary(simulate("router", rate, args.requests, args.seed))
        rr = summary(simulate("round_robin", rate, args.requests, args.seed))
        report["loads"][f"{rate:g}/s"] = {
            "router": router, "round_robin": rr,
            "ratio_round_robin_over_router": {"mean": round(rr["mean_s"] / router["mean_s"], 2),
                                              "p95": round(rr["p95_s"] / router["p95_s"], 2)},
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"example fleet, {args.requests} requests per run, workload {report['workload']}")
    print(f"{'load':>7}  {'policy':<12} {'mean s':>8} {'p95 s':>8}")
    for load, row in report["loads"].items():
        for policy in ("router", "round_robin"):
            print(f"{load:>7}  {policy:<12} {row[policy]['mean_s']:>8.2f} {row[policy]['p95_s']:>8.2f}")
        r = row["ratio_round_robin_over_router"]
        print(f"{'':>7}  round-robin / router: mean x{r['mean']}, p95 x{r['p95']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
