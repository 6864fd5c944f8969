"""GPU pools: how nodes of a GPU class are marked, and which variants each pool hosts.

One marking convention is shared by the pools' replica requirements, the cluster-launcher and
KubeRay configs that ``imageserve cluster-configs`` writes, and the simulated fleet:

* resources ``gpu_class:<id>`` (1 per GPU), ``vram_ge_<N>`` for every nominal size N the GPU reaches,
  and ``int4`` or ``fp4`` when nunchaku runs there;
* labels ``imageserve.io/gpu-class``, ``imageserve.io/vram-gib`` and ``imageserve.io/sm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.domain.catalog import Catalog, GPUClass, ModelVariant
from serve_app.domain.config import AppConfig, FleetConfig, PoolConfig, SwapGroupConfig
from serve_app.domain.parallelism import (
    PARALLEL_OFFLOAD_MODES,
    ParallelMode,
    ParallelPlan,
    choose_parallel,
    parallel_modes,
    plan_parallel_mode,
)
from serve_app.domain.planner import OFFLOAD_MODES, OffloadMode, Plan, estimate_seconds, plan
from serve_app.domain.swapping import SwapPlan, plan_swap_group

VRAM_TIERS = (8, 12, 16, 20, 24, 32, 40, 48, 80, 141)
# Tiers are nominal card sizes; vram_gib is what nvidia-smi reports, which is lower: the driver's reserve
# (~0.5%) and, on data-center GDDR cards, ECC's 1/16 (an L4 "24 GB" reports 22.49 GiB).
TIER_TOLERANCE = 0.93
GPU_CLASS_LABEL = "imageserve.io/gpu-class"
VRAM_GIB_LABEL = "imageserve.io/vram-gib"
SM_LABEL = "imageserve.io/sm"
# Replicas ask a sliver of a marker resource: the GPU count, not the marker, limits packing.
MARKER_SLIVER = 0.01


def gpu_class_resource(gpu: GPUClass) -> str:
    return f"gpu_class:{gpu.id}"


def node_resources(gpu: GPUClass, gpus_per_node: int = 1) -> dict[str, float]:
    """Custom resources a node with ``gpus_per_node`` GPUs of this class declares."""
    resources = {gpu_class_resource(gpu): float(gpus_per_node)}
    for tier in VRAM_TIERS:
        if gpu.vram_gib >= tier * TIER_TOLERANCE:
            resources[f"vram_ge_{tier}"] = float(gpus_per_node)
    if gpu.four_bit:
        resources[gpu.four_bit] = float(gpus_per_node)
    return resources


def node_labels(gpu: GPUClass) -> dict[str, str]:
    return {GPU_CLASS_LABEL: gpu.id, VRAM_GIB_LABEL: f"{gpu.vram_gib:g}", SM_LABEL: str(gpu.sm)}


def pool_requirements(pool: PoolConfig, gpu: GPUClass) -> dict:
    """ray_actor_options entries that pin a replica to this pool's nodes."""
    options: dict = {"resources": dict(pool.resources or {gpu_class_resource(gpu): MARKER_SLIVER})}
    if pool.label_selector:
        options["label_selector"] = dict(pool.label_selector)
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    return options


@dataclass(frozen=True)
class Placement:
    """A variant on a pool: its one-GPU plan, and the parallel mode its replicas run in instead, if any."""

    variant: ModelVariant
    pool: PoolConfig
    gpu: GPUClass
    plan: Plan
    seconds_per_image: float
    parallel: ParallelPlan | None = None

    @property
    def gpus_per_replica(self) -> int:
        return self.parallel.degree if self.parallel else 1


def place_on_pool(config: AppConfig, variant: ModelVariant, pool: PoolConfig,
                  gpu: GPUClass) -> tuple[Placement | None, str | None]:
    """``variant`` on ``pool``: one GPU per replica, or a parallel mode (the config's, else the planner's choice
    on multi-GPU nodes, ``choose_parallel``); or None and why not."""
    width, height, settings = config.defaults.width, config.defaults.height, config.device.planner
    forced_offload = config.offload_mode_for(variant.id)
    verdict = plan(variant, gpu, width, height, modes=pool.allowed_modes(forced_offload), settings=settings,
                   batch_size=config.batch_size(variant.id))
    parallel_offload = tuple(m for m in pool.allowed_modes(forced_offload) if m in PARALLEL_OFFLOAD_MODES)
    forced_parallel = config.models[variant.id].parallel
    if forced_parallel is not None:
        chosen = plan_parallel_mode(variant, gpu, ParallelMode.parse(forced_parallel), width, height, None,
                                    pool.gpus_per_node, settings, config.batch_size(variant.id),
                                    offload_modes=parallel_offload)
        if not chosen.fits:
            return None, chosen.reason
    elif pool.gpus_per_node > 1 and pool.multi_gpu_replicas:
        modes = [plan_parallel_mode(variant, gpu, mode, width, height, None, pool.gpus_per_node, settings,
                                    config.batch_size(variant.id), offload_modes=parallel_offload)
                 for mode in parallel_modes(pool.gpus_per_node)]
        chosen = choose_parallel(verdict, modes)
    else:
        chosen = None
    if chosen is not None:
        return Placement(variant, pool, gpu, verdict, chosen.seconds_per_image, chosen), None
    if not verdict.fits:
        return None, verdict.reason
    seconds = estimate_seconds(variant, gpu, verdict.mode, width, height, settings=settings).total_s
    return Placement(variant, pool, gpu, verdict, seconds), None


def place(config: AppConfig, catalog: Catalog | None = None) -> tuple[list[Placement], dict[str, str]]:
    """Every (variant, pool) the planner says works, and why each unplaced variant fits nowhere. Variants of
    a swap group are placed with their group (``place_swap_groups``)."""
    catalog = catalog or config.build_catalog()
    placements: list[Placement] = []
    unplaced: dict[str, str] = {}
    for model_id in config.models_to_load():
        if config.swap_group_of(model_id) is not None:
            continue
        variant = catalog.variant(model_id)
        reasons = []
        for pool in config.pools:
            gpu = catalog.gpu(pool.gpu_class)
            if pool.variants is not None and model_id not in pool.variants:
                reasons.append(f"{pool.name}: not in the pool's variant list")
                continue
            placement, why_not = place_on_pool(config, variant, pool, gpu)
            if placement is not None:
                placements.append(placement)
            else:
                reasons.append(f"{pool.name} ({gpu.name}): {why_not}")
        if not any(p.variant.id == model_id for p in placements):
            unplaced[model_id] = "fits no GPU pool: " + "; ".join(reasons)
    return placements, unplaced


@dataclass(frozen=True)
class GroupPlacement:
    group: SwapGroupConfig
    pool: PoolConfig
    gpu: GPUClass
    plan: SwapPlan


def plan_group_on(config: AppConfig, catalog: Catalog, group: SwapGroupConfig, gpu: GPUClass,
                  pool: PoolConfig | None = None) -> SwapPlan:
    """``plan_swap_group`` for ``group`` on ``gpu`` with the config's shape, modes and batch sizes."""
    def modes(variant_id: str) -> tuple[OffloadMode, ...]:
        forced = config.offload_mode_for(variant_id)
        if pool is not None:
            return pool.allowed_modes(forced)
        return (forced,) if forced else OFFLOAD_MODES

    return plan_swap_group(
        [catalog.variant(v) for v in group.variants], gpu, group.host_ram_gib, config.defaults.width,
        config.defaults.height, modes={v: modes(v) for v in group.variants}, settings=config.device.planner,
        batch_sizes={v: config.batch_size(v) for v in group.variants})


def place_swap_groups(config: AppConfig,
                      catalog: Catalog | None = None) -> tuple[list[GroupPlacement], dict[str, str]]:
    """Every (swap group, pool) the planner says works, and why each unplaced group fits no pool."""
    catalog = catalog or config.build_catalog()
    placements: list[GroupPlacement] = []
    unplaced: dict[str, str] = {}
    for group in config.swap_groups:
        reasons = []
        for pool in config.pools:
            gpu = catalog.gpu(pool.gpu_class)
            outside = [v for v in group.variants if pool.variants is not None and v not in pool.variants]
            if outside:
                reasons.append(f"{pool.name}: {outside} not in the pool's variant list")
                continue
            verdict = plan_group_on(config, catalog, group, gpu, pool)
            if verdict.fits:
                placements.append(GroupPlacement(group, pool, gpu, verdict))
            else:
                reasons.append(f"{pool.name} ({gpu.name}): {verdict.reason}")
        if not any(p.group.name == group.name for p in placements):
            unplaced[group.name] = "fits no GPU pool: " + "; ".join(reasons)
    return placements, unplaced


def capacity_warnings(config: AppConfig, fleet: FleetConfig, placements: list[Placement]) -> list[str]:
    """Pools whose GPUs (at max_nodes) cannot hold the minimum replicas placed on them."""
    warnings = []
    for pool in fleet.pools:
        here = [p for p in placements if p.pool.name == pool.name]
        needed = 0
        for p in here:
            options = config.deployment_options(p.variant.id, p.pool)
            replicas = options.autoscaling.min_replicas if options.autoscaling else (options.num_replicas or 1)
            needed += replicas * p.gpus_per_replica
        gpus = pool.max_nodes * pool.gpus_per_node
        if needed > gpus:
            warnings.append(f"pool {pool.name}: {len(here)} variants need {needed} GPUs at minimum, "
                            f"the pool has at most {gpus}; restrict `variants:` or add nodes")
    return warnings
