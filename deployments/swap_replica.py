"""Swap replicas: several variants on one GPU, taking turns, their weights waiting in host RAM.

A ``SwapReplica`` holds one ``ModelReplica`` per member variant (each with its own engine, batch queue,
metrics and encoders). At start each member is loaded from disk and warmed up on the GPU in turn, then
parked (its weights in host RAM only) before the next loads; the first member goes back on the GPU.

Every member's batches pass through one ``GpuArbiter``: one batch holds the GPU at a time, and a batch of a
member whose weights are not on the GPU first swaps (parks the resident member, copies its own weights back
from host RAM: no disk read). Which member goes next is ``serve_app.domain.swapping.next_variant``: the
resident member keeps the GPU while it has work, others get it when it has none or when they have waited a
turn (``max_wait_s``), so requests run grouped by variant.

Routing: calls name their variant as Serve's multiplexed model id (the router sets it per route), and the
replica reports the variant on its GPU through ``@serve.multiplexed``, so Serve's router sends requests first
to replicas where their variant already is. When every member fits the GPU at once (the planner's
``co_resident``), nothing swaps and nothing is reported: every replica has every member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.autoscaling_policy import BACKGROUND_METRIC, INTERACTIVE_METRIC
from deployments.metrics import SwapMetrics
from deployments.model_replica import ModelReplica, node_gpu_class
from serve_app.domain.catalog import GIB
from serve_app.domain.errors import ModelNotFoundError, ModelUnavailableError
from serve_app.domain.schemas import EditRequest, GenerateRequest, ImageResult, PartialImage, StreamAccepted
from serve_app.domain.specs import SwapGroupSpec
from serve_app.domain.swapping import SwapPlan, Waiting, next_variant, plan_swap_group
from serve_app.engines import EngineLoader
from serve_app.engines.protocol import Job

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    member: ModelReplica
    oldest_arrival: float
    granted: asyncio.Future


SwapListener = Callable[[str | None, str, float, int], None]


class GpuArbiter:
    """Gives a shared GPU to one member's batch at a time, swapping weights when the member changes.

    Args:
        members: the replicas sharing the GPU, by variant id; the first is the one on the GPU at start.
        max_wait_s: the policy's turn length (``next_variant``).
        co_resident: every member stays on the GPU: batches take turns, oldest first, and nothing swaps.
        on_swap: called on the event loop after each swap with (from, to, seconds, bytes copied to the GPU).
        clock: the clock of job arrivals (``Job.arrived``).
    """

    def __init__(self, members: dict[str, ModelReplica], max_wait_s: float, co_resident: bool,
                 on_swap: SwapListener | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.members = members
        self.max_wait_s = max_wait_s
        self.co_resident = co_resident
        self.resident: frozenset[str] = frozenset(members) if co_resident else frozenset(list(members)[:1])
        self.swaps = 0
        self._on_swap = on_swap
        self._clock = clock
        self.resident_since = clock()
        self._waiting: dict[str, _Waiter] = {}
        self._holder: str | None = None

    @contextlib.asynccontextmanager
    async def turn(self, member: ModelReplica, jobs: Sequence[Job]):
        """``GpuGate.turn``: wait for the GPU, swap ``member`` onto it if needed, hold it for the block."""
        loop = asyncio.get_running_loop()
        variant = member.variant.id
        waiter = _Waiter(member, min(job.arrived for job in jobs), loop.create_future())
        self._waiting[variant] = waiter  # a member's queue runs one batch at a time: one waiter per member
        self._grant()
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if self._waiting.get(variant) is waiter:
                del self._waiting[variant]
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._release()
            raise
        try:
            if variant not in self.resident:
                leaving = self.resident
                self.resident = frozenset()  # a swap that fails half-way leaves nothing known to be on the GPU
                started = self._clock()
                moved = await member.on_worker(self._swap, member, leaving)
                self.resident, self.resident_since = frozenset({variant}), self._clock()
                self.swaps += 1
                if self._on_swap is not None:
                    self._on_swap(next(iter(leaving), None), variant, self.resident_since - started, moved)
            yield
        finally:
            self._release()

    def _swap(self, member: ModelReplica, leaving: frozenset[str]) -> int:
        """On the incoming member's worker thread: park who leaves, then bring ``member``'s weights back."""
        for variant in leaving:
            self.members[variant].engine.park()
        return member.engine.unpark()

    def waiting(self) -> list[Waiting]:
        """Members with work, each with its oldest request: the batch at the gate, or what its queue holds."""
        now = self._clock()
        found = []
        for variant, member in self.members.items():
            arrivals = []
            if variant in self._waiting:
                arrivals.append(self._waiting[variant].oldest_arrival)
            age = member.oldest_queued_age()
            if age is not None:
                arrivals.append(now - age)
            if arrivals:
                found.append(Waiting(variant, min(arrivals)))
        return found

    def _grant(self) -> None:
        if self._holder is not None or not self._waiting:
            return
        choice = next_variant(self.waiting(), self.resident, self.resident_since, self._clock(), self.max_wait_s)
        waiter = self._waiting.pop(choice, None)
        if waiter is None:
            # The chosen member has queued work but its batch is still forming (its queue's wait for company,
            # or the loop turn between two batches): it comes to the gate shortly, and that grants it.
            return
        self._holder = choice
        waiter.granted.set_result(None)

    def _release(self) -> None:
        self._holder = None
        self._grant()


def _node_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


class SwapReplica:
    """Several variants (a swap group) on one GPU, swapping through host RAM.

    Args:
        spec: the group: its members' replica specs (the first starts on the GPU), policy and Serve options.
        loaders: variant id -> engine loader, for tests and benchmarks (``load_engine`` for the rest).
    """

    @classmethod
    def serve_options(cls, spec: SwapGroupSpec) -> dict[str, Any]:
        options = ModelReplica.serve_options(spec)
        # Room for a batch of each member, one running and one filling.
        room = 2 * max(m.batching.max_batch_size for m in spec.members)
        if options.get("max_ongoing_requests", 0) < room:
            options["max_ongoing_requests"] = room
        return options

    def __init__(self, spec: SwapGroupSpec, loaders: dict[str, EngineLoader] | None = None) -> None:
        loaders = loaders or {}
        self.spec = spec
        self.variants = spec.variant_ids
        self.node_gpu = node_gpu_class(spec.members[0].engine.gpus)
        self.plan = self._plan()
        self._unhealthy = (None if self.plan is None or self.plan.fits
                           else f"swap group {spec.group}: {self.plan.reason}")
        co_resident = self.plan.co_resident if self.plan is not None else False
        self.metrics = SwapMetrics(spec.group, self._gpu_class_label(), spec.pool.name if spec.pool else None)
        self.members: dict[str, ModelReplica] = {}
        self.arbiter = GpuArbiter(self.members, spec.max_wait_s, co_resident, on_swap=self._swapped)
        self._reported: str | None = None
        for member_spec in spec.members:
            member = ModelReplica(member_spec, loaders.get(member_spec.variant.id), gate=self.arbiter)
            self.members[member_spec.variant.id] = member
            if not co_resident:
                member.engine.park()  # before the next member loads onto the GPU
        if not co_resident:
            self.members[self.variants[0]].engine.unpark()
        self.arbiter.resident = frozenset(self.variants) if co_resident else frozenset(self.variants[:1])
        self.metrics.on_gpu(self.arbiter.resident, self.variants)
        if self._unhealthy is not None:
            logger.error("%s refuses to serve: %s", spec.name, self._unhealthy)

    def _gpu_class_label(self) -> str | None:
        """The GPU class its series carry, as its members' own series do: the catalog class of the GPU it got, or
        "cpu" where the members run on the CPU."""
        if self.node_gpu is not None:
            return self.node_gpu.id
        import torch

        device = self.spec.members[0].engine.device
        return "cpu" if device == "cpu" or (device == "auto" and not torch.cuda.is_available()) else None

    def _plan(self) -> SwapPlan | None:
        """The planner's verdict for the GPU this replica got (None on CPU, where the planner's full-size
        figures say nothing about the checkpoints loaded)."""
        if self.node_gpu is None:
            return None
        members = self.spec.members
        engine = members[0].engine
        return plan_swap_group(
            [m.variant for m in members], self.node_gpu, self.spec.host_ram_gib or _node_ram_gib(),
            engine.plan_width, engine.plan_height, modes={m.variant.id: m.engine.offload_modes for m in members},
            settings=engine.planner, batch_sizes={m.variant.id: m.engine.batch_size for m in members})

    def _swapped(self, from_variant: str | None, to_variant: str, seconds: float, moved: int) -> None:
        logger.info("%s: swapped %s -> %s in %.3fs (%.2f GB to the GPU)", self.spec.name, from_variant, to_variant,
                    seconds, moved / 1e9)
        self.metrics.swapped(from_variant, to_variant, seconds, moved, self.variants)
        self._report(to_variant)

    def _report(self, variant: str) -> None:
        """Tell Serve's routers which variant is on this replica's GPU (nothing outside a Serve replica, and
        nothing when every member stays on the GPU)."""
        if self.arbiter.co_resident or self._reported == variant:
            return
        try:
            serve.get_replica_context()
        except Exception:  # noqa: BLE001 - outside Serve (unit tests, benchmarks) there is no router to tell
            return
        self._reported = variant
        asyncio.get_running_loop().create_task(self._mark_resident(variant))

    @serve.multiplexed(max_num_models_per_replica=1)
    async def _mark_resident(self, variant: str) -> str:
        # Serve keeps the id this returns for as "loaded here" and evicts the previous one: exactly the
        # variant on the GPU. The weights themselves are moved by the arbiter, not by Serve.
        return variant

    async def check_health(self) -> None:
        if self._unhealthy is not None:
            raise RuntimeError(self._unhealthy)
        for member in self.members.values():
            await member.check_health()

    def shutdown(self) -> None:
        """Stop every member's threads (a constructor that raised leaves ``members`` unset or partial)."""
        for member in getattr(self, "members", {}).values():
            member.shutdown()

    def __del__(self) -> None:
        self.shutdown()

    def _member(self, variant: str | None) -> ModelReplica:
        if self._unhealthy is not None:
            raise ModelUnavailableError(f"{self.spec.name}: {self._unhealthy}", retry_after_s=5)
        variant = variant or serve.get_multiplexed_model_id()
        member = self.members.get(variant)
        if member is None:
            raise ModelNotFoundError(f"{self.spec.name} serves {', '.join(self.variants)}; name one of them "
                                     f"(multiplexed model id), not {variant!r}")
        if self._reported is None and len(self.arbiter.resident) == 1:  # none while a swap is under way
            self._report(next(iter(self.arbiter.resident)))
        return member

    async def run(self, request: GenerateRequest | EditRequest, width: int, height: int,
                  variant: str | None = None) -> ImageResult:
        """``ModelReplica.run`` on the member ``variant`` (the call's multiplexed model id when None)."""
        return await self._member(variant).run(request, width, height)

    async def stream(self, request: GenerateRequest | EditRequest, width: int, height: int,
                     variant: str | None = None,
                     background: bool = False) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]:
        """``ModelReplica.stream`` on the member ``variant`` (the call's multiplexed model id when None)."""
        async for event in self._member(variant).stream(request, width, height, background=background):
            yield event

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Its members' requests and batch lines, as one replica's (``ModelReplica.record_autoscaling_stats``)."""
        members = self.members.values()
        return {INTERACTIVE_METRIC: float(sum(m.interactive_ongoing for m in members)),
                BACKGROUND_METRIC: float(sum(m.background_ongoing for m in members))}

    async def info(self) -> dict[str, Any]:
        return {
            "group": self.spec.group,
            "variants": list(self.variants),
            "resident": sorted(self.arbiter.resident),
            "co_resident": self.arbiter.co_resident,
            "swaps": self.arbiter.swaps,
            "reported": self._reported,
            "plan": None if self.plan is None else self.plan.model_dump(),
            "unhealthy": self._unhealthy,
            "members": [await member.info() for member in self.members.values()],
        }


def build_swap_replica(spec: SwapGroupSpec, loaders: dict[str, EngineLoader] | None = None) -> Application:
    """The bound Serve deployment of one swap group."""
    return serve.deployment(SwapReplica).options(**SwapReplica.serve_options(spec)).bind(spec, loaders)
