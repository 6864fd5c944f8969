"""Typed specs: the config resolved once, at build time, into what each deployment needs.

``resolve_application`` turns an ``AppConfig`` into one ``ReplicaSpec`` per (variant, GPU pool)
and one ``RouterSpec``. Each deployment is bound its own small spec and never re-reads, re-validates
or re-resolves the whole config; the specs are frozen pydantic models, so they cross Ray's process
boundary as they are.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.domain.batches import BatchSettings
from serve_app.domain.catalog import Catalog, GPUClass, ModelVariant, Task
from serve_app.domain.config import (
    AppConfig,
    ConfigError,
    DeploymentOptions,
    HFConfig,
    OptimizationConfig,
    PoolConfig,
    ServingConfig,
    SwapGroupConfig,
    TorchDtype,
)
from serve_app.domain.parallelism import ParallelMode
from serve_app.domain.placement import place, place_swap_groups, pool_requirements
from serve_app.domain.planner import OFFLOAD_MODES, OffloadMode, PlannerSettings, plan
from serve_app.domain.quotas import KeyLimits


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Spec):
    """A per-request LoRA a replica may load: where its weight file is."""

    name: str
    source: str = Field(description="A local file or folder, or a hub repo id.")
    file: str | None = Field(default=None, description="The file's name in the folder or repo.")
    revision: str | None = Field(default=None, description="Commit of the hub repo (None: main).")


class EngineSpec(_Spec):
    """What a model engine needs to load and run one variant."""

    variant: ModelVariant
    source: str | None = Field(description="Local folder or hub repo id of the diffusers pipeline.")
    transformer_source: str | None = Field(default=None, description="4-bit: the nunchaku transformer file or folder.")
    revision: str | None = Field(default=None, description="Commit of the hub repo in `source` (None: main).")
    transformer_revision: str | None = Field(
        default=None, description="4-bit: commit of the catalog's nunchaku transformer repo (None: main).")
    lora_source: str | None = Field(default=None, description="Lightning: the LoRA file or folder (config's).")
    lora_revision: str | None = Field(default=None, description="Lightning: commit of the catalog's LoRA repo.")
    hf: HFConfig = Field(default_factory=HFConfig)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    torch_dtype: TorchDtype | None = Field(default=None, description="bfloat16 on CUDA, float32 on CPU when null.")
    offload_modes: tuple[OffloadMode, ...] = Field(
        default=OFFLOAD_MODES, description="Modes the engine may load with, fastest first; the planner picks.")
    plan_width: int | None = Field(default=None, description="Output width the offload mode is planned for.")
    plan_height: int | None = Field(default=None, description="Output height the offload mode is planned for.")
    batch_size: int = Field(default=1, ge=1, description="Images per pipeline call the planner must allow for.")
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    optimizations: OptimizationConfig = Field(default_factory=OptimizationConfig)
    edit_vae_image_area: int | None = Field(default=None, description="Edit: input area for the VAE.")
    edit_condition_image_area: int | None = Field(default=None, description="Edit: input area for the vision encoder.")
    max_input_pixels: int = Field(default=4096 * 4096, description="Largest input image the engine decodes.")
    gpus: tuple[GPUClass, ...] = Field(default=(), description="Known GPU classes, to name the local CUDA device.")
    pin_host_memory: bool = Field(default=True, description="Page-locked host copies when the engine is parked.")
    loras: tuple[LoraSpec, ...] = Field(default=(), description="Per-request LoRAs this variant takes.")
    max_loaded_loras: int = Field(default=4, ge=1, description="Per-request LoRAs kept loaded (LRU).")
    parallel: str | None = Field(default=None, description="cp2, tp4, ...: one replica over that many GPUs (ranks).")
    collective_timeout_s: float = Field(default=60.0, description="A parallel rank silent this long fails the replica.")

    @property
    def ranks(self) -> int:
        """Processes (one per GPU) the engine runs in."""
        return ParallelMode.parse(self.parallel).degree if self.parallel else 1


class PoolSpec(_Spec):
    """The GPU pool a replica belongs to, as placement saw it."""

    name: str
    gpu: GPUClass
    offload_mode: OffloadMode = Field(description="The mode placement planned for the pool's GPU.")


class BatchingSpec(_Spec):
    max_batch_size: int = Field(default=1, ge=1, description="Images one pipeline call may hold; 1 is off.")
    wait_s: float = Field(default=0.0, ge=0, description="How long an idle replica waits for a batch to fill.")


class ReplicaSpec(_Spec):
    """One model deployment: a variant on a pool, with its engine, batching and Serve options."""

    name: str = Field(description="Deployment name, e.g. 'gen-z-image-turbo@rtx4090'.")
    engine: EngineSpec
    pool: PoolSpec | None = None
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    warmup: bool = True
    torch_threads: int | None = None
    encode_workers: int = Field(
        default=2, ge=0, description="Threads that encode output images off the GPU's thread (0: on it).")
    png_writer: Literal["imageserve", "pillow"] = "imageserve"
    uses_gpu: bool = Field(description="Whether each replica takes a GPU (pools and CUDA do; CPU does not).")
    node_requirements: dict = Field(default_factory=dict, description="Actor options that pin it to its pool.")
    options: DeploymentOptions = Field(description="Serve options from serving, pool and model settings.")

    @property
    def variant(self) -> ModelVariant:
        return self.engine.variant

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.engine.variant.tasks

    @property
    def min_replicas(self) -> int:
        return self.options.autoscaling.min_replicas if self.options.autoscaling else (self.options.num_replicas or 1)


class SwapGroupSpec(_Spec):
    """One deployment whose replicas each host several variants on one GPU, swapping through host RAM."""

    name: str = Field(description="Deployment name, e.g. 'swap-single-gpu' or 'swap-mixed@rtx4090'.")
    group: str
    members: tuple[ReplicaSpec, ...] = Field(description="One spec per variant; the first starts on the GPU.")
    pool: PoolSpec | None = None
    max_wait_s: float
    pin_host_memory: bool = True
    host_ram_gib: float | None = None
    co_resident: bool | None = Field(
        description="The planner's verdict for the pool's GPU (null without pools: decided for the GPU found).")
    uses_gpu: bool
    node_requirements: dict = Field(default_factory=dict)
    options: DeploymentOptions

    @property
    def variant_ids(self) -> tuple[str, ...]:
        return tuple(m.variant.id for m in self.members)

    @property
    def min_replicas(self) -> int:
        return self.options.autoscaling.min_replicas if self.options.autoscaling else (self.options.num_replicas or 1)


class RouteSpec(_Spec):
    """One way the router can serve a variant: a replica deployment on one pool."""

    variant: str
    deployment: str
    shared: bool = Field(
        default=False, description="The deployment hosts several variants (a swap group): calls name the variant as "
                                   "Serve's multiplexed model id, and Serve prefers replicas that report it on "
                                   "their GPU.")
    pool: str = "default"
    gpu_class: str | None = None
    vram_gib: float | None = None
    cost_s: float | None = Field(default=None, description="Planner's seconds per image on this pool.")
    min_replicas: int = 1
    offload_mode: OffloadMode | None = Field(
        default=None, description="The offload mode the replica loads with on this pool (as LoadTarget plans it); "
                                  "None outside GPU pools.")
    parallel: str | None = Field(default=None, description="The replica's parallel mode (cp2, tp4, ...), if any.")
    co_resident: bool | None = Field(
        default=None, description="For a swap group's route: the planner's verdict that every member stays on the "
                                  "GPU, so nothing swaps (null outside swap groups, and where no GPU was planned).")


def key_digest(key: str | bytes) -> str:
    """sha256 hex of a key: what the router compares, and all of a key that leaves the config."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


class HttpSpec(_Spec):
    api_key_sha256: tuple[str, ...] = Field(
        default=(), description="Digests of the accepted keys (inline keys hashed); the router adds "
                                "IMAGESERVE_API_KEYS and the key file. None of them: open.")
    api_keys_file: str | None = Field(default=None, description="Key file, re-read when it changes.")
    host: str = Field(default="127.0.0.1", description="The address the service is configured to bind.")
    public: bool = Field(default=False, description="Open on a non-loopback host on purpose.")
    max_body_bytes: int = 50_000_000
    max_json_bytes: int = 64_000
    max_form_fields: int = 32
    max_form_field_bytes: int = 64_000
    body_read_timeout_s: float = Field(default=30.0, description="Seconds a body may take to arrive (408 past it).")
    metrics_route: bool = True
    metrics_key_sha256: tuple[str, ...] = Field(
        default=(), description="Digests of the keys that open /metrics (and nothing else); the router adds "
                                "IMAGESERVE_METRICS_KEYS.")
    show_internals: bool = Field(default=True, description="Answers name replica, pool, GPU class and timings; "
                                                           "probes and model cards show load and replicas.")
    stream_keepalive_s: float = Field(default=15.0, gt=0,
                                      description="A silent stream gets an SSE comment this often (idle proxies).")


class RouterSpec(_Spec):
    """The router (ingress): the catalog, what is served where, request limits and HTTP settings."""

    app_name: str
    catalog: Catalog
    default_width: int | None = None
    default_height: int | None = None
    max_input_pixels: int = 4096 * 4096
    max_request_cost: float | None = Field(default=None, description="Megapixel-steps a request may cost.")
    routes: tuple[RouteSpec, ...]
    unavailable: dict[str, str] = Field(default_factory=dict, description="Variant id -> why it is not served.")
    loras: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Per-request LoRA name -> the variants that take it (the allow-list).")
    http: HttpSpec = Field(default_factory=HttpSpec)
    batch: BatchSettings = Field(default_factory=BatchSettings,
                                 description="The Batch API, its state_dir resolved (``batch_state_dir``).")
    key_limits: KeyLimits = Field(default_factory=KeyLimits, description="Per-key limits, for the whole service.")
    max_ongoing_requests: int = 256
    max_queued_requests: int = 64
    num_replicas: int = 1
    num_cpus: float = 1.0
    graceful_shutdown_timeout_s: float = Field(
        default=20.0, description="How long a stopping router replica lets its requests finish.")


class ApplicationSpec(_Spec):
    replicas: tuple[ReplicaSpec, ...]
    swap_groups: tuple[SwapGroupSpec, ...] = ()
    router: RouterSpec
    unplaced: dict[str, str] = Field(default_factory=dict, description="Configured variants that fit no pool, and why.")


def swap_deployment_name(group: str, pool: str | None = None) -> str:
    return f"swap-{group}@{pool}" if pool else f"swap-{group}"


def deployment_name(variant: ModelVariant, pool: str | None = None) -> str:
    base = f"{variant.family.deployment_prefix}-{variant.id}"
    return f"{base}@{pool}" if pool else base


def engine_spec(config: AppConfig, variant: ModelVariant, catalog: Catalog,
                offload_modes: tuple[OffloadMode, ...] | None = None, parallel: str | None = None) -> EngineSpec:
    """How to load ``variant`` as ``config`` says (catalog defaults where it says nothing); ``parallel`` is the
    placement's multi-GPU mode (the config's own outside pools)."""
    model = config.models[variant.id]
    forced = config.offload_mode_for(variant.id)
    if offload_modes is None:
        offload_modes = (forced,) if forced else OFFLOAD_MODES
    pipeline, transformer = config.weights(variant.id)
    return EngineSpec(
        variant=variant,
        source=model.source or variant.source.local_path or variant.source.hub_repo,
        transformer_source=model.transformer_source,
        revision=pipeline.revision,
        transformer_revision=transformer.revision,
        lora_source=model.lora_source,
        lora_revision=config.lora_weights(variant.id).revision,
        hf=config.hf,
        device=config.device.device,
        torch_dtype=model.torch_dtype,
        offload_modes=offload_modes,
        plan_width=config.defaults.width,
        plan_height=config.defaults.height,
        batch_size=config.batch_size(variant.id),
        planner=config.device.planner,
        optimizations=model.optimizations,
        edit_vae_image_area=model.edit_vae_image_area,
        edit_condition_image_area=model.edit_condition_image_area,
        max_input_pixels=config.serving.limits.max_input_pixels,
        gpus=tuple(catalog.gpus.values()),
        loras=tuple(LoraSpec(name=name, source=lora.source, file=lora.file, revision=lora.revision)
                    for name, lora in config.loras_for(variant.id).items()),
        max_loaded_loras=model.max_loaded_loras,
        parallel=parallel,
        collective_timeout_s=model.collective_timeout_s,
    )


def _replica_spec(config: AppConfig, catalog: Catalog, variant: ModelVariant, pool: PoolConfig | None,
                  gpu: GPUClass | None, planned_mode: OffloadMode | None, cluster_has_gpus: bool,
                  parallel: str | None = None) -> ReplicaSpec:
    model = config.models[variant.id]
    if pool is not None:
        modes = (planned_mode,) if parallel else pool.allowed_modes(config.offload_mode_for(variant.id))
        engine = engine_spec(config, variant, catalog, modes, parallel)
        uses_gpu = True
    else:
        engine = engine_spec(config, variant, catalog, parallel=model.parallel)
        device = config.device.device
        uses_gpu = device == "cuda" or (device == "auto" and cluster_has_gpus)
    return ReplicaSpec(
        name=deployment_name(variant, pool.name if pool else None),
        engine=engine,
        pool=None if pool is None else PoolSpec(name=pool.name, gpu=gpu, offload_mode=planned_mode),
        batching=BatchingSpec(max_batch_size=model.max_batch_size, wait_s=model.batch_wait_timeout_s),
        warmup=config.serving.warmup,
        torch_threads=config.serving.torch_threads,
        encode_workers=config.serving.encode_workers,
        png_writer=config.serving.png_writer,
        uses_gpu=uses_gpu,
        node_requirements=pool_requirements(pool, gpu) if pool is not None else {},
        options=config.deployment_options(variant.id, pool),
    )


def _swap_group_spec(config: AppConfig, catalog: Catalog, group: SwapGroupConfig, pool: PoolConfig | None,
                     gpu: GPUClass | None, modes: dict[str, OffloadMode] | None, co_resident: bool | None,
                     cluster_has_gpus: bool) -> SwapGroupSpec:
    members = tuple(
        spec.model_copy(update={"engine": spec.engine.model_copy(update={"pin_host_memory": group.pin_host_memory})})
        for spec in (_replica_spec(config, catalog, catalog.variant(v), pool, gpu, (modes or {}).get(v),
                                   cluster_has_gpus) for v in group.variants))
    return SwapGroupSpec(
        name=swap_deployment_name(group.name, pool.name if pool else None), group=group.name, members=members,
        pool=members[0].pool, max_wait_s=group.max_wait_s, pin_host_memory=group.pin_host_memory,
        host_ram_gib=group.host_ram_gib, co_resident=co_resident, uses_gpu=members[0].uses_gpu,
        node_requirements=members[0].node_requirements, options=config.group_deployment_options(group, pool))


def resolve_application(config: AppConfig, cluster_has_gpus: bool = False) -> ApplicationSpec:
    """Every deployment of ``config``'s application, with its spec.

    Args:
        cluster_has_gpus: whether the cluster has GPUs; decides ``device: auto`` for replicas outside pools.
    """
    catalog = config.build_catalog()
    replicas: list[ReplicaSpec] = []
    routes: list[RouteSpec] = []
    unplaced: dict[str, str] = {}

    groups: list[SwapGroupSpec] = []

    def route(spec: ReplicaSpec, deployment: str, cost_s: float | None, min_replicas: int, shared: bool,
              co_resident: bool | None = None) -> None:
        gpu = spec.pool.gpu if spec.pool else None
        mode = None
        if spec.engine.parallel is not None:
            mode = spec.pool.offload_mode if spec.pool else None
        elif gpu is not None:  # what LoadTarget.for_spec will choose on that GPU
            engine = spec.engine
            verdict = plan(spec.variant, gpu, engine.plan_width, engine.plan_height, modes=engine.offload_modes,
                           settings=engine.planner, batch_size=engine.batch_size)
            mode = verdict.mode if verdict.fits else None
        routes.append(RouteSpec(
            variant=spec.variant.id, deployment=deployment, shared=shared,
            pool=spec.pool.name if spec.pool else "default", gpu_class=gpu.id if gpu else None,
            vram_gib=gpu.vram_gib if gpu else None, cost_s=cost_s, min_replicas=min_replicas, offload_mode=mode,
            parallel=spec.engine.parallel, co_resident=co_resident))

    def add(spec: ReplicaSpec, cost_s: float | None) -> None:
        replicas.append(spec)
        route(spec, spec.name, cost_s, spec.min_replicas, shared=False)

    def add_group(group: SwapGroupSpec, costs: dict[str, float | None]) -> None:
        groups.append(group)
        for member in group.members:
            route(member, group.name, costs.get(member.variant.id), group.min_replicas, shared=True,
                  co_resident=group.co_resident)

    if config.pools:
        placements, unplaced = place(config, catalog)
        for p in placements:
            mode = p.parallel.offload_mode if p.parallel else p.plan.mode
            add(_replica_spec(config, catalog, p.variant, p.pool, p.gpu, mode, cluster_has_gpus,
                              str(p.parallel.mode) if p.parallel else None), p.seconds_per_image)
        group_placements, unplaced_groups = place_swap_groups(config, catalog)
        for g in group_placements:
            modes = {m.variant: m.mode for m in g.plan.members}
            costs = {v: plan(catalog.variant(v), g.gpu, config.defaults.width, config.defaults.height,
                             modes=(modes[v],), settings=config.device.planner).seconds_per_image
                     for v in g.group.variants}
            add_group(_swap_group_spec(config, catalog, g.group, g.pool, g.gpu, modes, g.plan.co_resident,
                                       cluster_has_gpus), costs)
        for name, reason in unplaced_groups.items():
            group = next(g for g in config.swap_groups if g.name == name)
            for variant_id in group.variants:
                unplaced[variant_id] = f"its swap group {name} {reason}"
    else:
        for model_id in config.models_to_load():
            if config.swap_group_of(model_id) is None:
                add(_replica_spec(config, catalog, catalog.variant(model_id), None, None, None, cluster_has_gpus),
                    None)
        for group in config.swap_groups:
            add_group(_swap_group_spec(config, catalog, group, None, None, None, None, cluster_has_gpus), {})
    if not routes:
        raise ConfigError("no model to serve: list at least one variant under `models:` that fits a pool")
    router = _router_spec(config, catalog, routes, unplaced, [*replicas, *groups])
    return ApplicationSpec(replicas=tuple(replicas), swap_groups=tuple(groups), router=router, unplaced=unplaced)


def _unavailable(config: AppConfig, catalog: Catalog, served: set[str], unplaced: dict[str, str]) -> dict[str, str]:
    """Why each catalog variant not served is not: unplaced (the placement's reason), disabled, or not listed."""
    unavailable = dict(unplaced)
    for variant_id in catalog.variants:
        if variant_id not in served and variant_id not in unavailable:
            unavailable[variant_id] = (
                "disabled in this deployment's config" if variant_id in config.models
                else "not configured in this deployment (add it under `models:`)"
            )
    return unavailable


def _http_spec(serving: ServingConfig) -> HttpSpec:
    limits = serving.limits
    return HttpSpec(api_key_sha256=tuple(dict.fromkeys([*map(key_digest, serving.api_keys), *serving.api_key_sha256])),
                    api_keys_file=serving.api_keys_file, host=serving.host, public=serving.public,
                    max_body_bytes=int(limits.max_body_mb * 1e6), max_json_bytes=int(limits.max_json_kb * 1e3),
                    max_form_fields=limits.max_form_fields, max_form_field_bytes=int(limits.max_form_field_kb * 1e3),
                    body_read_timeout_s=limits.body_read_timeout_s, metrics_route=serving.metrics_route,
                    metrics_key_sha256=tuple(serving.metrics_key_sha256), show_internals=serving.internals_shown())


def batch_state_dir(settings: BatchSettings, app_name: str) -> str:
    """Where the Batch API keeps its store: the configured folder, else the application's own folder under
    $IMAGESERVE_STATE_DIR, else under ~/.local/state/imageserve (resolved where the config is, so every router
    replica gets the same; two applications never share a store, whose batches each runs on its own models)."""
    if settings.state_dir:
        return str(Path(settings.state_dir).expanduser())
    root = os.environ.get("IMAGESERVE_STATE_DIR") or "~/.local/state/imageserve"
    return str(Path(root).expanduser() / app_name)


def _router_spec(config: AppConfig, catalog: Catalog, routes: list[RouteSpec], unplaced: dict[str, str],
                 deployments: list[ReplicaSpec | SwapGroupSpec]) -> RouterSpec:
    serving = config.serving
    served = {r.variant for r in routes}
    return RouterSpec(
        app_name=serving.app_name,
        catalog=catalog,
        default_width=config.defaults.width,
        default_height=config.defaults.height,
        max_input_pixels=serving.limits.max_input_pixels,
        max_request_cost=serving.limits.max_request_cost,
        routes=tuple(routes),
        unavailable=_unavailable(config, catalog, served, unplaced),
        loras={name: tuple(v for v in lora.variants if v in served) for name, lora in config.loras.items()},
        http=_http_spec(serving),
        batch=serving.batch.model_copy(update={"state_dir": batch_state_dir(serving.batch, serving.app_name)}),
        key_limits=serving.limits.per_key,
        max_ongoing_requests=serving.limits.router_max_ongoing,
        max_queued_requests=serving.limits.router_max_queued,
        num_replicas=serving.router_replicas,
        num_cpus=serving.router_num_cpus,
        # A router waits on its replicas: stopping it must not cut requests they may still finish.
        graceful_shutdown_timeout_s=max([20.0, serving.request_timeout_s or 0.0,
                                         *(d.options.graceful_shutdown_timeout_s or 0.0 for d in deployments)]),
    )
