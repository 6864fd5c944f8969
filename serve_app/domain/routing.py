"""Routing policy: which (variant, GPU pool) serves a request. Plain Python, no Ray, so it is unit-tested.

Routes: each served variant has one route per GPU pool it is placed on (a deployment there).

Choice (docs/fleet.md, "Routing policy"):

1. Candidates: for a variant id, its routes; for an alias, on every pool the first of the alias's
   variants that the pool serves (so an alias means bf16 on 80 GB pools, int4 Lightning on 20-24 GB
   Ampere/Ada pools and fp4 on sm_120 pools).
2. Expected completion time of a route: the time until one of its replicas is free, then the work.
   With ``q`` requests outstanding on ``c`` running replicas, ``max(0, q - c + 1)`` of them must finish
   first, at ``c`` per image time: ``(1 + max(0, q - c + 1) / c) x seconds per image x n``. Seconds per
   image start from the planner's estimate for that GPU class; once requests have run on a route its
   measured latency (EWMA) takes over, and routes not yet measured get their estimate scaled by how
   measured routes compare with their estimates. A route whose deployment has no running replica
   (scaled to zero) pays a cold-start penalty.
3. Routing cost: what the request adds to everyone's waiting, not only its own completion. Joining a
   queue also delays whoever comes after it; for a queue at utilisation rho the marginal delay is
   ``work / (1 - rho)^2`` (the derivative of an M/M/1 queue's total delay), and ``completion / work``
   estimates ``1 / (1 - rho)``, so the cost is ``completion^2 / work``. On an idle fleet that is the
   plain work, so the fastest route wins; under load an idle slow route takes work well before the
   fast routes' queues grow as long as its own service time, which is where a greedy
   earliest-completion rule leaves everyone waiting (bench/placement.py measures both).
   Every route within ``SLACK`` of the lowest cost is good enough; among those the route on the GPU
   with the least VRAM wins, so large GPUs stay free for what only they can hold.
4. Out of memory: the request is retried once, on the best route with more VRAM than the one that failed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from serve_app.domain.catalog import Catalog, ModelVariant
from serve_app.domain.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError

DEFAULT_MODEL = {"generate": "z-image-turbo", "edit": "qwen-image-edit"}
ENDPOINT = {"generate": "/v1/images/generations", "edit": "/v1/images/edits"}
SLACK = 0.25              # routes within 25% of the lowest routing cost count as equal
COLD_START_S = 60.0       # penalty for a route with no running replica (load + warm-up, est.)
MEASURED_WEIGHT = 0.3     # EWMA weight of each new latency measurement


@dataclass
class Route:
    """One way to serve a variant: its deployment on one GPU pool."""

    pool: str
    gpu_class: str | None
    deployment: str
    handle: Any = None
    vram_gib: float | None = None
    cost_s: float | None = None
    min_replicas: int = 1
    measured_s: float | None = None
    offload_mode: str | None = None  # the mode its replicas load with (None: not planned, e.g. CPU)

    def observe(self, seconds_per_image: float) -> None:
        if self.measured_s is None:
            self.measured_s = seconds_per_image
        else:
            self.measured_s += MEASURED_WEIGHT * (seconds_per_image - self.measured_s)


Option = tuple[ModelVariant, Route]


class RoutingTable:
    """The routes of every served variant and the policy above."""

    def __init__(self, catalog: Catalog, routes: dict[str, list[Route]], unavailable: dict[str, str]) -> None:
        self.catalog = catalog
        self.routes = routes
        self.unavailable = unavailable
        self.outstanding: Counter[str] = Counter()
        self.replicas: dict[str, int] = {}

    def resolve(self, name: str | None, task: str) -> list[ModelVariant]:
        """A requested model name (variant id or alias) -> the served variants it may run as, preferred first."""
        name = name or DEFAULT_MODEL[task]
        try:
            candidates = self.catalog.candidates(name)
        except KeyError:
            raise ModelNotFoundError(
                f"unknown model {name!r}; known models: {', '.join(self.catalog.names())}", param="model"
            ) from None
        for_task = [v for v in candidates if task in v.tasks]
        if not for_task:
            other = candidates[0].tasks[0]
            raise InvalidRequestError(
                f"{name} is {'an edit' if other == 'edit' else 'a generation'} model: send it to {ENDPOINT[other]}",
                param="model",
            )
        served = [v for v in for_task if self.routes.get(v.id)]
        if not served:
            reasons = "; ".join(f"{v.id}: {self.unavailable.get(v.id, 'not deployed')}" for v in for_task)
            raise ModelUnavailableError(f"no replica of this deployment can serve {name} ({reasons})", param="model")
        return served

    def options(self, variants: list[ModelVariant]) -> list[Option]:
        """On each pool, the first of ``variants`` that the pool serves."""
        chosen: dict[str, Option] = {}
        for variant in variants:
            for route in self.routes[variant.id]:
                chosen.setdefault(route.pool, (variant, route))
        return list(chosen.values())

    def calibration(self) -> float:
        """Mean measured/estimated ratio over measured routes (1 before any measurement)."""
        ratios = [r.measured_s / r.cost_s for rs in self.routes.values() for r in rs if r.measured_s and r.cost_s]
        return sum(ratios) / len(ratios) if ratios else 1.0

    def seconds_per_image(self, route: Route, calibration: float) -> float:
        if route.measured_s is not None:
            return route.measured_s
        return (route.cost_s or 1.0) * calibration

    def expected_completion_s(self, route: Route, images: int = 1, calibration: float = 1.0) -> float:
        running = self.replicas.get(route.deployment, route.min_replicas)
        work = self.seconds_per_image(route, calibration) * images
        outstanding = self.outstanding[route.deployment]
        if running <= 0:
            return COLD_START_S + (outstanding + 1) * work
        ahead = max(0, outstanding - running + 1)
        return (1 + ahead / running) * work

    def routing_cost_s(self, route: Route, images: int = 1, calibration: float = 1.0) -> float:
        """The marginal delay of sending this request to ``route`` (policy step 3)."""
        completion = self.expected_completion_s(route, images, calibration)
        if self.replicas.get(route.deployment, route.min_replicas) <= 0:
            return completion
        return completion * completion / (self.seconds_per_image(route, calibration) * images)

    def choose(self, options: list[Option], images: int = 1) -> Option | None:
        if not options:
            return None
        calibration = self.calibration()
        scored = [(self.routing_cost_s(r, images, calibration), v, r) for v, r in options]
        best = min(score for score, _, _ in scored)
        good = [item for item in scored if item[0] <= best * (1 + SLACK)]
        _, variant, route = min(good, key=lambda item: (item[2].vram_gib or 0.0, item[0]))
        return variant, route

    def not_ready(self, running: dict[str, int]) -> dict[str, str]:
        """Served variants that cannot take a request now, with why, given running replicas per deployment.
        A variant is ready when one of its routes has a running replica, or may scale from zero (its
        deployment starts one on the first request)."""
        waiting = {}
        for variant_id, routes in sorted(self.routes.items()):
            if not any(running.get(r.deployment, 0) > 0 or r.min_replicas == 0 for r in routes):
                pools = ", ".join(r.pool for r in routes)
                waiting[variant_id] = f"no running replica yet (pools: {pools}); it may still be loading"
        return waiting

    def larger_than(self, options: list[Option], failed: Route) -> list[Option]:
        """Options on GPUs with more VRAM than the route that ran out of memory."""
        return [(v, r) for v, r in options
                if r.deployment != failed.deployment and (r.vram_gib or 0) > (failed.vram_gib or 0)]
