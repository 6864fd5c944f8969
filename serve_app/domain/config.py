"""The one YAML configuration, validated by pydantic: the schema of every section, and ``parse_config`` /
``parse_fleet`` for data already read. Reading the files is ``config_files``; the rules that span sections are
``config_rules``.

Errors name the bad key and what is allowed; unknown keys are errors, never ignored. The
keys that users of the original planning documents already write (``device.enable_cpu_offload``,
``models.<id>.torch_dtype``) keep their meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from serve_app.domain.batches import BatchSettings
from serve_app.domain.catalog import Catalog, build_catalog
from serve_app.domain.config_rules import check_config
from serve_app.domain.parallelism import PARALLEL_MODE_PATTERN
from serve_app.domain.planner import OFFLOAD_MODES, OffloadMode, PlannerSettings
from serve_app.domain.quotas import KeyLimits

TorchDtype = Literal["bfloat16", "float16", "float32"]


class ConfigError(ValueError):
    """A configuration file that does not validate; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceConfig(_Section):
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Where pipelines run; 'auto' takes CUDA when present, else CPU."
    )
    enable_cpu_offload: bool = Field(
        default=False,
        description="Planning-document key: true means offload_mode 'model' unless offload_mode says otherwise.",
    )
    offload_mode: Literal["auto", "none", "model", "sequential"] = Field(
        default="auto", description="'auto' takes the fastest mode the VRAM planner says fits."
    )
    planner: PlannerSettings = Field(default_factory=PlannerSettings)

    def requested_mode(self) -> OffloadMode | None:
        """The forced offload mode, or None for the planner's choice."""
        if self.offload_mode != "auto":
            return self.offload_mode
        return "model" if self.enable_cpu_offload else None


def is_local_path(source: str) -> bool:
    """A pipeline ``source`` that is a folder on this machine rather than a hub repo id."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().is_dir()


@dataclass(frozen=True)
class HubPin:
    """A hub repository and the commit it is pinned to (None: its main branch)."""

    repo: str | None
    revision: str | None


class HFConfig(_Section):
    cache_dir: str | None = Field(default=None, description="Hugging Face cache folder (HF_HOME's hub by default).")
    offline: bool = Field(
        default=True, description="Never reach the Hub at load time; weights must be local or cached.")
    require_pinned_revisions: bool = Field(
        default=False,
        description="Refuse a config that loads any hub repo at no pinned commit (models.<id>.revision or the "
                    "catalog's): an unpinned repo follows main, so an upstream push changes the served model at "
                    "the next download.")


class ResolutionConfig(_Section):
    width: int | None = Field(default=None, ge=16, description="Default output width (the variant's when null).")
    height: int | None = Field(default=None, ge=16, description="Default output height (the variant's when null).")


class AutoscalingConfig(_Section):
    """Ray Serve replica autoscaling for one deployment (see Ray's AutoscalingConfig)."""

    min_replicas: int = Field(default=1, ge=0, description="0 lets a rarely used variant scale to zero.")
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=1.0, gt=0, description="Requests per replica to aim for.")
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    batch_backlog_share: float = Field(
        default=0.0, ge=0, le=1,
        description="Batch lines add no replica by default (they use idle time); above 0, a batch backlog may scale "
                    "this deployment up to this share of max_replicas (docs/batch.md).")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentOptions(_Section):
    """Ray Serve options of a model deployment; unset fields take ``serving.deployment``'s."""

    num_replicas: int | None = Field(default=None, ge=1, description="Fixed replica count (when not autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Autoscale instead of fixed replicas.")
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="Requests a replica holds at once.")
    max_queued_requests: int | None = Field(default=None, ge=-1, description="Past this, callers get 503/429.")
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0, description="1 on CUDA and 0 on CPU when null.")
    resources: dict[str, float] | None = Field(
        default=None, description="Custom Ray resources, e.g. {vram_ge_24: 0.01}.")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type, e.g. 'A100-80G'.")
    label_selector: dict[str, str] | None = Field(default=None, description="Ray node label selector.")
    health_check_period_s: float | None = Field(default=None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0)

    def merged_over(self, base: DeploymentOptions) -> DeploymentOptions:
        return DeploymentOptions.model_validate(
            {**base.model_dump(exclude_none=True), **self.model_dump(exclude_unset=True, exclude_none=True)}
        )


class LimitsConfig(_Section):
    max_body_mb: float = Field(
        default=50.0, gt=0, description="Largest request body (like OpenAI's edit API); 413 past it.")
    max_json_kb: float = Field(
        default=64.0, gt=0,
        description="Largest JSON body (the generation route): its longest valid request, two 4000-character "
                    "prompts, is under 20 KB. 413 past it, before anything is parsed.")
    max_input_pixels: int = Field(default=4096 * 4096, ge=64 * 64, description="Largest input image, in pixels.")
    max_request_cost: float | None = Field(
        default=1000.0, gt=0,
        description="Largest request, in megapixel-steps: output megapixels x steps x n x (1 + input images), x 2 "
                    "when it runs classifier-free guidance (two forwards a step); 422 past it. A 1024x1024 edit at 40 "
                    "steps with one input image and CFG (Qwen-Image-Edit's default) costs 168. null: no bound.")
    per_key: KeyLimits = Field(
        default_factory=KeyLimits,
        description="Limits per API key, weighted by each request's cost in megapixel-steps (429 and Retry-After "
                    "past them): cost_per_minute and burst_cost (a token bucket), max_in_flight_cost and "
                    "max_in_flight_requests. Requests without a key (handle calls) are not limited per key.")
    max_form_fields: int = Field(
        default=32, ge=16, description="Parts of an edit's multipart form, files included (the form has 16 fields).")
    max_form_field_kb: float = Field(
        default=64.0, gt=0, description="Largest non-file part of a multipart form (a prompt is at most 4000 "
                                        "characters); files are bounded by max_body_mb.")
    body_read_timeout_s: float = Field(
        default=30.0, gt=0,
        description="Seconds a request body may take to arrive; past it 408, and the connection's slot is freed.")
    router_max_ongoing: int = Field(
        default=256, ge=1,
        description="Requests one router replica works on at once (checking them, waiting on model replicas).")
    router_max_queued: int = Field(
        default=64, ge=0,
        description="Requests waiting for a router replica past router_max_ongoing; past it 429 with Retry-After. "
                    "Worst-case request bodies held: (router_max_ongoing + router_max_queued) x max_body_mb.")


class ServingConfig(_Section):
    app_name: str = Field(default="imageserve", description="Ray Serve application name.")
    host: str = Field(default="127.0.0.1", description="HTTP bind address (imageserve run).")
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = Field(default="/")
    warmup: bool = Field(default=True, description="Run one tiny request per replica before it takes traffic.")
    torch_threads: int | None = Field(default=None, ge=1, description="torch CPU threads per replica.")
    encode_workers: int = Field(
        default=2, ge=0,
        description="Threads per replica that encode output images (PNG/JPEG/WEBP) while the GPU's thread runs "
                    "the next pipeline call; a batch's images are encoded in parallel. 0 encodes on the GPU's "
                    "thread after each call, as imageserve did before (bench/hot_path.py compares the two).")
    png_writer: Literal["imageserve", "pillow"] = Field(
        default="imageserve",
        description="PNG encoder: imageserve's own (parallel run-length deflate, ~10x faster than Pillow's "
                    "defaults for the same size) or Pillow with its defaults (the fallback).")
    request_timeout_s: float | None = Field(default=None, gt=0, description="HTTP 408 past this (imageserve run).")
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_replicas=1, max_ongoing_requests=4, max_queued_requests=32),
        description="Defaults for every model deployment.",
    )
    router_replicas: int = Field(default=1, ge=1, description="Replicas of the HTTP router (ingress).")
    router_num_cpus: float = Field(default=1.0, ge=0, description="CPUs each router replica reserves.")
    batch: BatchSettings = Field(default_factory=BatchSettings,
                                 description="OpenAI's Files and Batches API for images (docs/batch.md).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_keys: list[str] = Field(
        default_factory=list, repr=False,
        description="Bearer keys, inline: for local runs. Hashed when the app is built, so only their sha256 "
                    "reaches Ray. In production use IMAGESERVE_API_KEYS or api_keys_file (docs/security.md).",
    )
    api_key_sha256: list[str] = Field(
        default_factory=list, description="sha256 hex digests of accepted keys: safe to write in a config.")
    public: bool = Field(
        default=False, description="The endpoint is meant for anyone: serve on a non-loopback host with no API "
                                   "keys. Without it, that combination refuses to start.")
    api_keys_file: str | None = Field(
        default=None, description="File of keys on the router's node, one per line, re-read when it changes "
                                  "(rotation without a redeploy); a Kubernetes Secret mounted as a file.")

    @field_validator("api_key_sha256", "metrics_key_sha256")
    @classmethod
    def _digests(cls, digests: list[str]) -> list[str]:
        bad = [i for i, d in enumerate(digests) if not re.fullmatch(r"[0-9a-f]{64}", d)]
        if bad:
            raise ValueError(f"entries {bad} are not sha256 hex digests (64 lowercase hex digits)")
        return digests
    metrics_route: bool = Field(
        default=True,
        description="Serve /metrics on the HTTP port (single-node runs); false leaves only Ray's metrics export "
                    "port, which Prometheus scrapes on a cluster. With API keys configured, /metrics takes a metrics "
                    "key only (metrics_key_sha256 or IMAGESERVE_METRICS_KEYS): it shows every key's series.",
    )
    metrics_key_sha256: list[str] = Field(
        default_factory=list,
        description="sha256 hex digests of the bearer keys that open /metrics (a scraper's), and nothing else; "
                    "added to IMAGESERVE_METRICS_KEYS. API keys do not open /metrics.")
    show_internals: bool | None = Field(
        default=None,
        description="Answers name the replica, pool, GPU class and stage timings (queue_s shows others' load); "
                    "/healthz shows requests in flight per deployment, /readyz replica counts, /v1/models pools "
                    "and replicas. false: none of it (the probes say only ok or ready). null: shown unless the "
                    "endpoint is public. Set false for a multi-tenant endpoint.")

    def internals_shown(self) -> bool:
        return not self.public if self.show_internals is None else self.show_internals


class PoolConfig(_Section):
    """A set of Ray nodes with one catalog GPU class, and how replicas find them."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Pool name, used in deployment names and metrics.")
    gpu_class: str = Field(description="Catalog GPU class id (or name) of every GPU in this pool.")
    resources: dict[str, float] | None = Field(
        default=None, description="What a replica asks of a node; default a sliver of `gpu_class:<id>`.",
    )
    label_selector: dict[str, str] | None = Field(
        default=None, description="Ray node label selector, if labels mark the pool.")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator_type, if that marks the pool.")
    max_offload_mode: Literal["none", "model", "sequential"] = Field(
        default="model", description="Heaviest offload mode served here; sequential streams weights every step.",
    )
    variants: list[str] | None = Field(default=None, description="Only these variants here (all that fit when null).")
    deployment: DeploymentOptions | None = Field(
        default=None, description="Ray Serve options for this pool's deployments.")
    gpus_per_node: int = Field(
        default=1, ge=1, description="GPUs per node: a multi-GPU replica (cp2, tp4, ...) takes up to this many.")
    multi_gpu_replicas: bool = Field(
        default=True, description="Where one GPU holds a variant only by streaming its weights every step (or not at "
                                  "all), its replicas span GPUs of a node in the parallel mode the planner prices "
                                  "best. false: one GPU per replica unless models.<id>.parallel says otherwise.")

    def allowed_modes(self, forced: OffloadMode | None = None) -> tuple[OffloadMode, ...]:
        """Offload modes a replica may load with here, fastest first (only ``forced`` when given)."""
        modes = OFFLOAD_MODES[: OFFLOAD_MODES.index(self.max_offload_mode) + 1]
        return tuple(m for m in modes if forced is None or m == forced)


class SwapGroupConfig(_Section):
    """Variants that share every GPU of one deployment, taking turns on it (docs/single-gpu.md)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Group name; its deployment is `swap-<name>`.")
    variants: list[str] = Field(min_length=2, description="Variant ids (configured under `models:`) in the group.")
    host_ram_gib: float | None = Field(
        default=None, gt=0,
        description="RAM of each node the group runs on: every member's weights stay in host RAM, so the planner "
                    "refuses a group whose weights do not fit. null: the replica checks the RAM it finds.")
    max_wait_s: float = Field(
        default=10.0, ge=0,
        description="Turn length: a request of a variant that is not on the GPU waits about this long at most "
                    "while another has work, and a variant swapped in keeps the GPU at least this long while it "
                    "has work. Longer turns swap less; 0 swaps whenever another variant waits.")
    pin_host_memory: bool = Field(
        default=True, description="Keep the host copies in page-locked memory (faster copies to the GPU).")
    deployment: DeploymentOptions | None = Field(default=None, description="Ray Serve options for the group.")


AttentionBackend = Literal["native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn",
                           "flash", "sage", "xformers"]
class StepCacheConfig(_Section):
    """Step caching from diffusers' own hooks: a denoising step reuses the previous step's transformer output
    where it changes little. A quality trade-off: docs/benchmarks.md ("Step caching") measures the forwards
    saved and the pixel difference on the tiny models."""

    kind: Literal["first_block", "taylorseer"] = Field(
        description="first_block: run the first block, and skip the rest when its output moved less than "
                    "`threshold` since the last full step (diffusers' FirstBlockCacheConfig). taylorseer: a full "
                    "forward every `cache_interval` steps, the steps between predicted from a first-order "
                    "Taylor expansion (TaylorSeerCacheConfig).")
    threshold: float = Field(default=0.05, gt=0, description="first_block: relative change below which the rest "
                                                              "of the transformer is skipped; higher skips more.")
    cache_interval: int = Field(default=5, ge=2, description="taylorseer: steps between full forwards.")
    disable_cache_before_step: int = Field(
        default=3, ge=1, description="taylorseer: steps computed in full first, to fit the expansion.")


class OptimizationConfig(_Section):
    """Speed options for one model; bench/gpu_fullsize.py measures each against the default."""

    attention_backend: AttentionBackend | None = Field(
        default=None,
        description="diffusers attention backend of the transformer (torch SDPA's choice when null); "
                    "'_native_*' pin one SDPA kernel, 'flash'/'sage'/'xformers' need those packages.",
    )
    compile_transformer: bool = Field(
        default=False, description="torch.compile the transformer at load (slower start; warm-up compiles).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="torch.compile mode when compile_transformer is true.",
    )
    vae_channels_last: bool = Field(default=False, description="Run the VAE in channels-last memory format.")
    step_cache: StepCacheConfig | None = Field(
        default=None, description="Step caching (off when null); trades quality for transformer forwards.")


class LoraConfig(_Section):
    """A LoRA that requests may ask for by name (``lora: {name, scale}``): the service's allow-list, with where
    each LoRA's weights come from and which variants take it (docs/loras.md)."""

    source: str = Field(description="A local .safetensors file, a folder holding `file`, or a hub repo id.")
    file: str | None = Field(
        default=None, description="The weight file's name in the folder or hub repo (required for a hub repo).")
    revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$", description="Commit of the hub repo (its main when null).")
    variants: list[str] = Field(
        min_length=1, description="Variant ids (configured under `models:`) whose transformer takes this LoRA: "
                                  "bf16 ones of the base model it was trained on.")

    @property
    def is_local(self) -> bool:
        return is_local_path(self.source)


class ModelConfig(_Section):
    enabled: bool = Field(default=True, description="Load and serve this variant.")
    source: str | None = Field(
        default=None, description="Local folder or hub repo id of the diffusers pipeline (catalog's when null)."
    )
    transformer_source: str | None = Field(
        default=None, description="4-bit variants: local .safetensors file or folder of the nunchaku transformer."
    )
    revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$",
        description="Commit of the pipeline's hub repo to download and load (`imageserve download` prints the one "
                    "it fetched); the catalog's pin when null and `source` is the catalog's repo.",
    )
    transformer_revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$",
        description="4-bit variants: commit of the nunchaku transformer's hub repo (the catalog's when null).",
    )
    lora_source: str | None = Field(
        default=None, description="Lightning variants: local .safetensors file (or folder holding the catalog's "
                                  "file name) of the LoRA fused at load; the catalog's hub repo when null.")
    lora_revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$",
        description="Lightning variants: commit of the LoRA's hub repo (the catalog's when null).")
    torch_dtype: TorchDtype | None = Field(
        default=None, description="Compute dtype; bfloat16 on CUDA and float32 on CPU when null."
    )
    offload_mode: Literal["auto", "none", "model", "sequential"] | None = Field(
        default=None, description="Per-model override of device.offload_mode."
    )
    edit_vae_image_area: int | None = Field(
        default=None, ge=64 * 64,
        description="Edit only: pixel area each input image is resized to for the VAE (pipeline default 1024*1024).",
    )
    edit_condition_image_area: int | None = Field(
        default=None, ge=28 * 28,
        description="Edit only: pixel area each input image is resized to for the vision encoder (default 384*384).",
    )
    deployment: DeploymentOptions | None = Field(default=None, description="Per-model Ray Serve options.")
    max_batch_size: int = Field(
        default=1, ge=1, le=64,
        description="Generation only: up to this many images run in one pipeline call when requests of the same "
                    "size, steps and guidance wait together (Ray Serve batching); 1 turns batching off.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, le=1, description="How long the first request of a batch waits for others to join.",
    )
    optimizations: OptimizationConfig = Field(default_factory=OptimizationConfig)
    max_loaded_loras: int = Field(
        default=4, ge=1, le=64,
        description="Per-request LoRAs each replica keeps loaded (least recently used replaced, by hotswap).")
    parallel: str | None = Field(
        default=None, pattern=PARALLEL_MODE_PATTERN,
        description="One replica across GPUs of one node: cp2/cp4/cp8 (context parallel, Ulysses) or tp2/tp4/tp8 "
                    "(tensor parallel). Null: the planner's choice on pools (one GPU wherever one fits without "
                    "streaming weights), one process elsewhere. docs/multi-gpu.md.")
    collective_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="Parallel replicas: a rank silent this long (no denoising step done, or not done after the call) "
                    "fails the replica, and Serve replaces it.")


class AppConfig(_Section):
    """Everything imageserve reads from its YAML file."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    hf: HFConfig = Field(default_factory=HFConfig)
    defaults: ResolutionConfig = Field(default_factory=ResolutionConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="Variant id -> settings; only variants listed here are served."
    )
    pools: list[PoolConfig] = Field(
        default_factory=list, description="GPU pools of the fleet; empty means one pool of whatever the replica gets.",
    )
    swap_groups: list[SwapGroupConfig] = Field(
        default_factory=list,
        description="Variants served together by one deployment per GPU, swapping through host RAM; a variant in "
                    "a group gets no deployment of its own.")
    loras: dict[str, LoraConfig] = Field(
        default_factory=dict,
        description="Name -> LoRA: the adapters requests may apply by name (`lora: {name, scale}`); any other "
                    "name is refused.")
    load: list[str] | None = Field(
        default=None,
        description="Which of `models` to load (all enabled ones when null); on small GPUs list one at a time.",
    )
    catalog: dict[str, Any] | None = Field(
        default=None, description="Extra or replacement GPU classes, components, variants and aliases."
    )

    @field_validator("catalog")
    @classmethod
    def _catalog_builds(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            unknown = set(value) - {"gpus", "components", "variants", "aliases"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}; allowed: gpus, components, variants, aliases")
            build_catalog(value)
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> AppConfig:
        check_config(self, info.context is None or info.context.get("check_compatibility", True))
        return self

    def loras_for(self, model_id: str) -> dict[str, LoraConfig]:
        """The LoRAs requests may apply to ``model_id``, by name."""
        return {name: lora for name, lora in self.loras.items() if model_id in lora.variants}

    def weights(self, model_id: str, catalog: Catalog | None = None) -> tuple[HubPin, HubPin]:
        """Where ``model_id``'s pipeline and (4-bit variants) transformer come from on the Hub, and at which
        commit; ``repo`` is None for what loads from a local path (or, for the transformer, is not needed)."""
        variant, model = (catalog or self.build_catalog()).variant(model_id), self.models[model_id]
        source = model.source or variant.source.local_path or variant.source.hub_repo
        pipeline = HubPin(None, None)
        if source is not None and not is_local_path(source):
            catalog_pin = variant.source.revision if source == variant.source.hub_repo else None
            pipeline = HubPin(source, model.revision or catalog_pin)
        transformer = HubPin(None, None)
        if variant.requires_nunchaku and not model.transformer_source:
            transformer = HubPin(variant.source.transformer_repo,
                                 model.transformer_revision or variant.source.transformer_revision)
        return pipeline, transformer

    def lora_weights(self, model_id: str, catalog: Catalog | None = None) -> HubPin:
        """Where a Lightning variant's LoRA comes from on the Hub and at which commit (``repo`` None: from a local
        file, or no LoRA)."""
        source, model = (catalog or self.build_catalog()).variant(model_id).source, self.models[model_id]
        if source.lora_repo is None or model.lora_source:
            return HubPin(None, None)
        return HubPin(source.lora_repo, model.lora_revision or source.lora_revision)

    def build_catalog(self) -> Catalog:
        return build_catalog(self.catalog)

    def models_to_load(self) -> list[str]:
        names = self.load if self.load is not None else list(self.models)
        return [m for m in names if self.models[m].enabled]

    def swap_group_of(self, model_id: str) -> SwapGroupConfig | None:
        return next((g for g in self.swap_groups if model_id in g.variants), None)

    def deployment_options(self, model_id: str, pool: PoolConfig | None = None) -> DeploymentOptions:
        """serving.deployment, then the pool's options, then the model's: later wins."""
        options = self.serving.deployment
        for layer in (pool.deployment if pool else None, self.models[model_id].deployment):
            if layer is not None:
                options = layer.merged_over(options)
        return options

    def group_deployment_options(self, group: SwapGroupConfig, pool: PoolConfig | None = None) -> DeploymentOptions:
        """serving.deployment, then the pool's options, then the group's: later wins."""
        options = self.serving.deployment
        for layer in (pool.deployment if pool else None, group.deployment):
            if layer is not None:
                options = layer.merged_over(options)
        return options

    def batch_size(self, model_id: str) -> int:
        """Images per pipeline call the planner must allow for (1 unless batching is on)."""
        model = self.models.get(model_id)
        return model.max_batch_size if model else 1

    def offload_mode_for(self, model_id: str) -> OffloadMode | None:
        override = self.models[model_id].offload_mode
        if override is not None:
            return None if override == "auto" else override
        return self.device.requested_mode()


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk ``loc`` through nested pydantic models and dicts; return the allowed keys there."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
        while get_origin(current) is not None and get_origin(current) is not dict:
            args = [a for a in get_args(current) if a is not type(None)]
            current = args[0] if args else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None,
                            what: str = "configuration") -> str:
    model = model or AppConfig
    lines = [f"{source}: invalid {what}"]
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: unknown key{hint}")
        else:
            got = item.get("input")
            secret = any(isinstance(part, str) and "api_key" in part for part in loc)  # never echo a key
            shown = "" if secret or isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "config", check_compatibility: bool = True) -> AppConfig:
    """Validate ``data``; ``check_compatibility=False`` keeps the combinations ``compatibility.RULES`` refuse (for
    ``imageserve doctor``, which lists them)."""
    try:
        return AppConfig.model_validate(data or {}, context={"check_compatibility": check_compatibility})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


class FleetPool(PoolConfig):
    """A pool as a fleet file describes it: the serving settings of ``PoolConfig`` plus its nodes.

    The node counts are for the cluster configs ``imageserve cluster-configs`` writes and for the
    simulated fleet; the serving application never reads them.
    """

    nodes: int = Field(default=1, ge=0, description="Nodes to start with (the autoscaler's minimum).")
    max_nodes: int = Field(default=4, ge=0, description="The autoscaler's upper bound.")

    def serving_pool(self) -> PoolConfig:
        """The pool as the serving application's config declares it (no node counts)."""
        return PoolConfig.model_validate(
            self.model_dump(exclude={"nodes", "max_nodes"}, exclude_unset=True))


class FleetConfig(_Section):
    """A fleet: its GPU pools and their nodes. One file defines it; the serve config, the cluster
    configs and the simulated fleet are made from it."""

    pools: list[FleetPool] = Field(min_length=1, description="The fleet's GPU pools.")

    @model_validator(mode="after")
    def _unique_names(self) -> FleetConfig:
        names = [p.name for p in self.pools]
        if len(names) != len(set(names)):
            raise ValueError(f"pools: names must be unique, got {names}")
        return self

    def pool(self, name: str) -> FleetPool:
        return next(p for p in self.pools if p.name == name)

    def serve_with(self, config: AppConfig) -> AppConfig:
        """``config`` serving on this fleet's pools (they replace any pools it had)."""
        data = config.model_dump(mode="json", exclude_unset=True)
        data["pools"] = [p.serving_pool().model_dump(mode="json", exclude_unset=True) for p in self.pools]
        return parse_config(data, "config on the fleet")


def parse_fleet(data: dict[str, Any] | None, source: str = "fleet") -> FleetConfig:
    try:
        return FleetConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, FleetConfig, "fleet")) from None


