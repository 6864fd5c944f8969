"""The router's policy against fair baselines, on the example fleet, side by side in one run.

A discrete-event queueing simulation. Placement and the routing policy are imageserve's own
(``serve_app.domain.placement.place`` and ``serve_app.domain.routing.RoutingTable``); service times
are the planner's per-image estimates for each (variant, GPU class) with +-20% noise; arrivals are
Poisson with a mixed workload. Tiny CPU models cannot show GPU speed differences, so this is how the
policy's effect is measured here; a GPU fleet measures it for real.

Every replica is one GPU with its own FIFO queue, as a Serve replica is. Three policies choose a
replica for each request, all over the same candidates (for each pool, the variant the requested
name resolves to there):

- ``router``: imageserve's policy picks a route (variant on a pool), then Serve's power of two
  choices picks one of that route's replicas, as ``route.handle.run.remote`` does in production.
- ``earliest``: the router before it priced the queue a request joins, for comparison: the same
  routes, each request to the route where it would itself finish first.
- ``p2c``: Ray Serve's default router over every replica of every candidate, across pools: two
  replicas at random, the shorter queue wins. What a user gets from plain Serve with one deployment
  per model spanning the fleet.
- ``jsq``: join the shortest queue over every candidate replica (ties at random): cost-blind,
  but with full knowledge of every queue, so stronger than p2c.

Loads are fractions of the fleet's capacity for this workload: the highest arrival rate any split
of the traffic over the candidates can sustain, the optimum of a small linear program. Prints
mean and p95 completion time per policy and load, and the router's ratio to the better baseline.

``--averaged``: also the routing costs tried for the 95 % tail (issue 31) and rejected, each route's
load taken from its outstanding requests averaged over time (``TimeAveragedTable``) instead of
counted at the instant; printed as their ratios to the better baseline, beside the router's.

    .venv/bin/python -m bench.placement [--requests 6000] [--seed 0] [--loads 0.3,0.5,0.7,0.85,0.95]
                                        [--averaged] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from dataclasses import dataclass

from serve_app.domain.config import parse_config
from serve_app.domain.config_files import load_fleet
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
POLICIES = ("router", "earliest", "p2c", "jsq")
BASELINES = ("p2c", "jsq")
SERVICE_NOISE = 0.2


class EarliestCompletionTable(RoutingTable):
    """The routing policy with its cost replaced by the request's own expected completion time."""

    def routing_cost_s(self, route: Route, images: int = 1, calibration: float = 1.0) -> float:
        return self.expected_completion_s(route, images, calibration)


class TimeAveragedTable(RoutingTable):
    """The routing cost with each route's load from its outstanding requests averaged over the last
    ``tau_s`` of simulated time (an exponential average, updated whenever the count changes), for the
    95 % tail (issue 31). ``kind``: ``queue`` counts the requests ahead from the average instead of the
    instant; ``utilisation`` prices an M/M/c queue (Sakasegawa's approximation) at the averaged busy
    fraction. Both send work to the slow idle routes earlier than the instant count does, which costs
    more than it saves (docs/benchmarks.md)."""

    kind = "queue"
    tau_s = 30.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.now = 0.0
        self.average: dict[str, float] = {}
        self.updated: dict[str, float] = {}

    def set_clock(self, now: float) -> None:
        """Fold every count into its average up to ``now``; the simulation calls it before a count changes."""
        for deployment, count in self.outstanding.items():
            weight = math.exp(-(now - self.updated.get(deployment, now)) / self.tau_s)
            self.average[deployment] = self.average.get(deployment, 0.0) * weight + count * (1 - weight)
            self.updated[deployment] = now
        self.now = now

    def routing_cost_s(self, route: Route, images: int = 1, calibration: float = 1.0) -> float:
        running = self.replicas.get(route.deployment, route.min_replicas)
        work = self.seconds_per_image(route, calibration) * images
        factor = self.expected_completion_s(route, images, calibration) / work
        averaged = self.average.get(route.deployment, 0.0)
        if self.kind == "queue":
            factor = max(factor, 1 + max(0.0, averaged - running + 1) / running)
        else:
            busy = min(0.98, min(averaged, running) / running)
            factor = max(factor, 1 + busy ** (math.sqrt(2 * (running + 1)) - 1) / (running * (1 - busy)))
        return work * factor * factor


AVERAGED = {"averaged queue, 30 s": ("queue", 30.0), "averaged queue, 120 s": ("queue", 120.0),
            "M/M/c at averaged utilisation, 30 s": ("utilisation", 30.0)}


def build_table(table_class: type[RoutingTable] = RoutingTable) -> tuple[RoutingTable, dict[str, int]]:
    """The example fleet's routing table and each route's replica count (GPUs of a pool shared out
    among the variants placed on it, the remainder to the first ones)."""
    fleet = load_fleet(FLEET)
    models = {m for _, m, _ in WORKLOAD} | {
        "qwen-image-edit-2511", "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step", "z-image-turbo-svdq-fp4-r32"}
    # Sorted: the placement's order decides the replicas' order, and with it each seeded run.
    served = sorted(m for m in models if m != "qwen-image-edit")
    config = fleet.serve_with(parse_config({"models": {m: {} for m in served}}))
    placements, _ = place(config)
    routes: dict[str, list[Route]] = {}
    on_pool: dict[str, list[str]] = {}
    for p in placements:
        name = f"{p.variant.id}@{p.pool.name}"
        on_pool.setdefault(p.pool.name, []).append(name)
        routes.setdefault(p.variant.id, []).append(Route(
            pool=p.pool.name, gpu_class=p.gpu.id, deployment=name, vram_gib=p.gpu.vram_gib,
            cost_s=p.seconds_per_image))
    replicas: dict[str, int] = {}
    for pool_name, names in on_pool.items():
        pool = fleet.pool(pool_name)
        share, extra = divmod(pool.nodes * pool.gpus_per_node, len(names))
        for i, name in enumerate(names):
            replicas[name] = max(1, share + (1 if i < extra else 0))
    table = table_class(config.build_catalog(), routes, {})
    table.replicas = dict(replicas)
    return table, replicas


def candidates(table: RoutingTable, workload=WORKLOAD) -> dict[str, list[Route]]:
    """For each requested model of the workload, the routes a request for it may take."""
    return {model: [route for _, route in table.options(table.resolve(model, task))] for task, model, _ in workload}


def capacity(table: RoutingTable, replicas: dict[str, int], workload=WORKLOAD) -> float:
    """Requests per second the fleet sustains for ``workload`` under the best static split.

    Linear program: choose the fraction f[m, r] of model m's traffic sent to route r to minimise the
    busiest route's utilisation u at one request per second; the capacity is then 1 / u.
    """
    from scipy.optimize import linprog

    by_model = candidates(table, workload)
    variables = [(model, route) for model, routes in by_model.items() for route in routes]
    deployments = sorted(replicas)
    n = len(variables)
    objective = [0.0] * n + [1.0]
    # Each route's work per second, over its replicas, is at most u.
    upper = [[0.0] * (n + 1) for _ in deployments]
    for i, (model, route) in enumerate(variables):
        share = next(w for _, m, w in workload if m == model)
        upper[deployments.index(route.deployment)][i] = share * route.cost_s / replicas[route.deployment]
    for row in upper:
        row[n] = -1.0
    # Each model's fractions sum to one.
    equal = [[1.0 if variables[i][0] == model else 0.0 for i in range(n)] + [0.0] for model in by_model]
    solved = linprog(objective, A_ub=upper, b_ub=[0.0] * len(deployments), A_eq=equal, b_eq=[1.0] * len(equal),
                     bounds=[(0, None)] * (n + 1), method="highs")
    if not solved.success:
        raise RuntimeError(f"capacity LP failed: {solved.message}")
    return 1.0 / solved.x[n]


@dataclass
class Replica:
    route: Route
    free_at: float = 0.0
    queued: int = 0          # requests on this replica, in service or waiting


def simulate(policy: str, rate: float, requests: int, seed: int) -> list[float]:
    """Completion times (arrival to image) of ``requests`` Poisson arrivals at ``rate`` per second."""
    if policy in AVERAGED:
        kind, tau_s = AVERAGED[policy]
        table_class = type("Averaged", (TimeAveragedTable,), {"kind": kind, "tau_s": tau_s})
    else:
        table_class = EarliestCompletionTable if policy == "earliest" else RoutingTable
    table, replicas = build_table(table_class)
    clock = getattr(table, "set_clock", lambda now: None)
    by_model = candidates(table)
    pool_of = {name: [Replica(route) for _ in range(replicas[route.deployment])]
               for routes in table.routes.values() for route in routes for name in [route.deployment]}
    arrival_rng, choice_rng, service_rng = (random.Random(f"{seed}-{part}") for part in ("arrive", "choose", "serve"))
    finishing: list[tuple[float, int, Replica]] = []
    latencies: list[float] = []
    names = [m for _, m, _ in WORKLOAD]
    weights = [w for _, _, w in WORKLOAD]
    now = 0.0
    for request in range(requests):
        now += arrival_rng.expovariate(rate)
        while finishing and finishing[0][0] <= now:
            finished_at, _, done = heapq.heappop(finishing)
            clock(finished_at)
            done.queued -= 1
            table.outstanding[done.route.deployment] -= 1
        clock(now)
        model = arrival_rng.choices(names, weights)[0]
        if policy in ("router", "earliest", *AVERAGED):
            _, route = table.choose(table.options(table.resolve(model, next(t for t, m, _ in WORKLOAD if m == model))))
            replica = power_of_two(pool_of[route.deployment], choice_rng)
        else:
            everyone = [r for route in by_model[model] for r in pool_of[route.deployment]]
            replica = power_of_two(everyone, choice_rng) if policy == "p2c" else shortest(everyone, choice_rng)
        service = replica.route.cost_s * service_rng.uniform(1 - SERVICE_NOISE, 1 + SERVICE_NOISE)
        replica.free_at = max(now, replica.free_at) + service
        replica.queued += 1
        table.outstanding[replica.route.deployment] += 1
        heapq.heappush(finishing, (replica.free_at, request, replica))
        latencies.append(replica.free_at - now)
    return latencies


def power_of_two(replicas: list[Replica], rng: random.Random) -> Replica:
    """Ray Serve's default replica choice: two at random, the one with fewer requests on it."""
    if len(replicas) == 1:
        return replicas[0]
    a, b = rng.sample(replicas, 2)
    return a if a.queued <= b.queued else b


def shortest(replicas: list[Replica], rng: random.Random) -> Replica:
    fewest = min(r.queued for r in replicas)
    return rng.choice([r for r in replicas if r.queued == fewest])


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"mean_s": round(sum(ordered) / len(ordered), 2), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2)}


def compare(loads: list[float], requests: int, seed: int, averaged: bool = False) -> dict:
    table, replicas = build_table()
    fleet_capacity = capacity(table, replicas)
    report = {"workload": {m: w for _, m, w in WORKLOAD}, "fleet": str(FLEET.name),
              "replicas": replicas, "capacity_per_s": round(fleet_capacity, 4), "loads": {}}
    for load in loads:
        rate = load * fleet_capacity
        row = {policy: summary(simulate(policy, rate, requests, seed)) for policy in POLICIES}
        best = {key: min(row[b][key] for b in BASELINES) for key in ("mean_s", "p95_s")}
        row["rate_per_s"] = round(rate, 4)
        row["router_over_best_baseline"] = {"mean": round(row["router"]["mean_s"] / best["mean_s"], 2),
                                            "p95": round(row["router"]["p95_s"] / best["p95_s"], 2)}
        if averaged:
            for name in AVERAGED:
                tried = summary(simulate(name, rate, requests, seed))
                row.setdefault("averaged_over_best_baseline", {})[name] = {
                    "mean": round(tried["mean_s"] / best["mean_s"], 2), "p95": round(tried["p95_s"] / best["p95_s"], 2)}
        report["loads"][f"{load:.0%}"] = row
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loads", default="0.3,0.5,0.7,0.85,0.95", help="fractions of the fleet's capacity")
    parser.add_argument("--averaged", action="store_true", help="also the time-averaged costs tried and rejected")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = compare([float(x) for x in args.loads.split(",")], args.requests, args.seed, args.averaged)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"example fleet, capacity {report['capacity_per_s']:.3f} requests/s for workload {report['workload']}; "
          f"{args.requests} requests per run, seed {args.seed}")
    print(f"{'load':>5} {'req/s':>6}  " + "  ".join(f"{p + ' mean':>13} {p + ' p95':>12}" for p in POLICIES)
          + "   router/best baseline: mean   p95")
    for load, row in report["loads"].items():
        cells = "  ".join(f"{row[p]['mean_s']:>13.2f} {row[p]['p95_s']:>12.2f}" for p in POLICIES)
        ratio = row["router_over_best_baseline"]
        print(f"{load:>5} {row['rate_per_s']:>6.3f}  {cells}   x{ratio['mean']:<22} x{ratio['p95']}")
    if args.averaged:
        print("\nover the best baseline, mean and p95: the router, and the time-averaged costs (TimeAveragedTable)")
        print(f"{'load':>5}  {'router':>14}  " + "  ".join(f"{name:>36}" for name in AVERAGED))
        for load, row in report["loads"].items():
            ratio = row["router_over_best_baseline"]
            tried = "  ".join(f"{pair(r):>36}" for r in row["averaged_over_best_baseline"].values())
            print(f"{load:>5}  {pair(ratio):>14}  {tried}")
    return 0


def pair(ratio: dict) -> str:
    return f"x{ratio['mean']:.2f}, x{ratio['p95']:.2f}"


if __name__ == "__main__":
    sys.exit(main())
