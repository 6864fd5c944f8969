"""The fleet as the console's fleet view shows it (``GET /v1/fleet``): plain Python over what the router already
holds, so it is unit-tested without Ray.

- Pools: each GPU pool with its GPU class and VRAM, from the resolved routes.
- Variants: each served variant's routes, with the replicas Serve reports running and starting, how the planner
  placed it (its offload mode, a swap group, or a member of a swap group that never swaps), the requests this
  router has at its deployments, and the p50/p95 seconds of its recent answers (``RecentLatencies``).

Without ``show_internals`` the answer keeps only what a caller of the public API may learn: which variants are
served and whether each can take a request now.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from serve_app.domain.catalog import Catalog
from serve_app.domain.specs import RouteSpec

# Serve's replica states that are on their way to RUNNING (Ray 2.60 serve/_private/common.py, ReplicaState).
STARTING_STATES = ("STARTING", "UPDATING", "RECOVERING")

RECENT_WINDOW_S = 300.0  # "recent": the answers of the last five minutes
RECENT_MAX_SAMPLES = 512  # per variant; at more than ~1.7 answers a second the window is the last 512


class RecentLatencies:
    """The seconds of each variant's recent answers, for p50/p95 in the fleet view.

    A bounded window per variant (``window_s``, at most ``max_samples``): a status page wants what users see
    now, and a Prometheus histogram (``imageserve_request_latency_seconds``) keeps the long view."""

    def __init__(self, window_s: float = RECENT_WINDOW_S, max_samples: int = RECENT_MAX_SAMPLES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, variant: str, seconds: float) -> None:
        samples = self._samples.setdefault(variant, deque(maxlen=self.max_samples))
        samples.append((self.clock(), seconds))

    def summary(self, variant: str) -> dict[str, Any]:
        """``{"count", "p50_s", "p95_s", "window_s"}`` over the window (the percentiles None without answers)."""
        samples = self._samples.get(variant, deque())
        horizon = self.clock() - self.window_s
        while samples and samples[0][0] < horizon:
            samples.popleft()
        values = sorted(seconds for _, seconds in samples)
        return {"count": len(values), "p50_s": nearest_rank(values, 0.50), "p95_s": nearest_rank(values, 0.95),
                "window_s": self.window_s}


def nearest_rank(sorted_values: list[float], quantile: float) -> float | None:
    """The nearest-rank percentile: a value that was measured, never an interpolation between two."""
    if not sorted_values:
        return None
    return round(sorted_values[max(math.ceil(quantile * len(sorted_values)) - 1, 0)], 3)


def placement_of(route: RouteSpec) -> str:
    """How the planner placed a route's variant: ``replicas`` (its own deployment), ``swap_group`` (sharing a
    GPU with other variants, swapping through host RAM) or ``resident_member`` (a swap group whose members all
    fit the GPU at once, so nothing swaps)."""
    if not route.shared:
        return "replicas"
    return "resident_member" if route.co_resident else "swap_group"


def fleet_status(catalog: Catalog, routes: Iterable[RouteSpec], replica_states: Mapping[str, Mapping[str, int]],
                 outstanding: Mapping[str, int], latencies: RecentLatencies, internals: bool) -> dict[str, Any]:
    """The fleet view's JSON (module docstring).

    Args:
        routes: every served (variant, pool) route, as the router's spec resolves them.
        replica_states: deployment -> Serve's replica state -> count, as the router's status cache last read it.
        outstanding: deployment -> the interactive requests this router has there now.
        internals: ``serving.show_internals``: without it, only served variants and whether each is ready.
    """
    by_variant: dict[str, list[RouteSpec]] = {}
    for route in routes:
        by_variant.setdefault(route.variant, []).append(route)

    def running(route: RouteSpec) -> int:
        return replica_states.get(route.deployment, {}).get("RUNNING", 0)

    variants = []
    for variant_id in sorted(by_variant):
        variant = catalog.variants[variant_id]
        entry: dict[str, Any] = {"id": variant_id, "tasks": list(variant.tasks),
                                 "ready": any(running(r) > 0 for r in by_variant[variant_id])}
        if internals:
            entry["routes"] = [{
                "pool": r.pool, "gpu_class": r.gpu_class, "deployment": r.deployment,
                "running": running(r),
                "starting": sum(replica_states.get(r.deployment, {}).get(s, 0) for s in STARTING_STATES),
                "placement": placement_of(r), "offload_mode": r.offload_mode, "parallel": r.parallel,
                "queue_depth": outstanding.get(r.deployment, 0),
            } for r in by_variant[variant_id]]
            entry["queue_depth"] = sum(route["queue_depth"] for route in entry["routes"])
            entry["latency"] = latencies.summary(variant_id)
        variants.append(entry)
    answer: dict[str, Any] = {"object": "fleet", "internals": internals, "variants": variants}
    if internals:
        pools: dict[str, dict[str, Any]] = {}
        for routes_of_variant in by_variant.values():
            for r in routes_of_variant:
                gpu = catalog.gpus.get(r.gpu_class) if r.gpu_class else None
                pool = pools.setdefault(r.pool, {"pool": r.pool, "gpu_class": r.gpu_class,
                                                 "gpu_name": gpu.name if gpu else None,
                                                 "vram_gib": r.vram_gib, "variants": []})
                pool["variants"].append(r.variant)
        answer["pools"] = [{**p, "variants": sorted(p["variants"])} for _, p in sorted(pools.items())]
    return answer
