"""The model/GPU catalog: what each model variant is and what each GPU class can do.

The data lives in ``catalog.yaml`` next to this module; users extend or override it from
their own config (``catalog:``), so adding a GPU class or a variant needs no code change.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.domain.families import FAMILIES, PipelineFamily, Task, family_of

Precision = Literal["bf16", "fp16", "fp8", "int4", "fp4"]
StoredDtype = Literal["fp32", "bf16", "fp16", "int4", "fp4"]
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int4": 0.5, "fp4": 0.5}
GIB = 1024**3  # bytes; every "GiB" in the project is this

# nunchaku's check_hardware_compatibility and its setup.py build targets (docs/facts.md).
INT4_SMS = (75, 80, 86, 89)
FP4_SMS = (120, 121)
CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_compute_capability(value: str) -> int:
    """'8.9' -> 89, '12.0' -> 120 (the sm_XX number)."""
    major, _, minor = str(value).partition(".")
    if not major.isdigit() or not minor.isdigit() or len(minor) != 1:
        raise ValueError(f"compute capability must look like '8.9' or '12.0', got {value!r}")
    return int(major) * 10 + int(minor)


# PCI Express x16 per direction: 16 GT/s (4.0) and 32 GT/s (5.0) per lane, 128b/130b encoding.
PCIE4_X16_GBPS = 31.5
PCIE5_X16_GBPS = 63.0


class PeerLink(_Strict):
    """The GPU-to-GPU path inside one node, as a collective sees it."""

    kind: Literal["nvlink", "pcie-p2p", "via-host"] = Field(
        description="nvlink: NVLink/NVSwitch; pcie-p2p: peer-to-peer over PCIe; via-host: no peer access (GeForce "
                    "cards since the 40 series), every byte is staged through host memory.")
    gbps: float = Field(gt=0, description="Nominal rate per direction per GPU, GB/s.")
    source: str = Field(description="Where the figure comes from.")


class GPUClass(_Strict):
    """One kind of NVIDIA GPU, as the planner and the router see it."""

    id: str = Field(description="Short stable id used in configs and metrics labels, e.g. 'rtx-4090'.")
    name: str = Field(description="Marketing name as nvidia-smi shows it, e.g. 'RTX 4090'.")
    compute_capability: str = Field(description="CUDA compute capability 'major.minor', e.g. '8.9'.")
    architecture: str = Field(description="Ampere, Ada, Hopper, Blackwell, ...")
    vram_gib: float = Field(gt=0, description="Total device memory in GiB, as nvidia-smi reports it.")
    bf16_tflops: float | None = Field(default=None, gt=0, description="Dense bf16 tensor TFLOPS.")
    memory_bandwidth_gbps: float | None = Field(default=None, gt=0, description="Memory bandwidth in GB/s.")
    nvidia_smi_names: tuple[str, ...] = Field(
        default=(), description="Device names nvidia-smi (and torch.cuda.get_device_name) print for this card.")
    vram_reported_by: Literal["nvidia-smi", "derived"] = Field(
        default="nvidia-smi",
        description="Where vram_gib comes from: a published nvidia-smi figure, or derived from the spec sheet by "
                    "the rule those figures follow (catalog.yaml, docs/facts.md).")
    unified_memory: bool = Field(
        default=False, description="CPU and GPU share one memory (GB10): offloading to the host frees nothing.")
    host_link_gbps: float | None = Field(
        default=None, gt=0,
        description="Host-to-GPU link rate per direction in GB/s (PCIe 4.0 x16: 31.5; 5.0 x16: 63); null: the "
                    "architecture's usual slot (Ampere and Ada 4.0 x16, Hopper and Blackwell 5.0 x16).")
    peer_link: PeerLink | None = Field(
        default=None,
        description="How two GPUs of one node exchange data (multi-GPU replicas); null: peer-to-peer over the "
                    "host link (``peer_link_of``).")

    @field_validator("compute_capability")
    @classmethod
    def _check_cc(cls, value: str) -> str:
        parse_compute_capability(value)
        return value

    @property
    def sm(self) -> int:
        return parse_compute_capability(self.compute_capability)

    @property
    def link_gbps(self) -> float:
        """The host-to-GPU link's nominal rate per direction (GB/s)."""
        if self.host_link_gbps is not None:
            return self.host_link_gbps
        return PCIE5_X16_GBPS if self.architecture in ("Hopper", "Blackwell") else PCIE4_X16_GBPS

    @property
    def peer(self) -> PeerLink:
        """The GPU-to-GPU path: the catalog's, else peer-to-peer over the host link."""
        if self.peer_link is not None:
            return self.peer_link
        return PeerLink(kind="pcie-p2p", gbps=self.link_gbps,
                        source=f"no NVLink figure in the catalog: PCIe peer-to-peer at the host link's "
                               f"{self.link_gbps:g} GB/s")

    @property
    def four_bit(self) -> Literal["int4", "fp4"] | None:
        """Which nunchaku 4-bit format this GPU runs, if any (Hopper and sm_100 run neither)."""
        if self.sm in INT4_SMS:
            return "int4"
        if self.sm in FP4_SMS:
            return "fp4"
        return None


class ComponentSpec(_Strict):
    """One module of a pipeline (transformer, text encoder, VAE) and what it costs in memory."""

    params_b: float = Field(gt=0, description="Parameters in billions (counted on the meta device).")
    stored_dtype: StoredDtype = Field(description="dtype of the weights as stored in the checkpoint.")
    weights_gb: float | None = Field(
        default=None, gt=0, description="Weight bytes in GB when not params x dtype (quantized files)."
    )
    num_blocks: int = Field(default=1, ge=1, description="Repeated blocks; per-block offload keeps one resident.")
    largest_module_params_b: float = Field(
        default=0.0, ge=0, description="Largest single module (e.g. embedding table), in billions."
    )
    # For a module with no trace in calibration.yaml (a user's own), the activations as the user estimates them.
    activation_gib_fixed: float = Field(default=0.0, ge=0, description="Activation memory independent of size.")
    activation_gib_per_1k_tokens: float = Field(default=0.0, ge=0, description="Activations per 1k sequence tokens.")
    activation_gib_per_mpix: float = Field(default=0.0, ge=0, description="Activations per megapixel (VAE).")
    activation_gib_per_image: float = Field(default=0.0, ge=0, description="Activations per input image.")
    per_block_offload: bool = Field(default=True, description="Whether per-block / sequential offload works.")
    widest_linear_features: int | None = Field(
        default=None, ge=1,
        description="Input features of the widest linear layer (a 4-bit transformer quantizes that layer's input "
                    "activations into a buffer of their own).")
    traced_module: str | None = Field(
        default=None,
        description="The traced module (calibration.yaml) whose activations this component has: the shared "
                    "component's id by default; a nunchaku transformer names the bf16 module it replaces.")
    flops_per_token: float = Field(
        default=0.0, ge=0,
        description="Forward FLOPs per sequence token from the linear layers (2 x params a token meets).",
    )
    attention_flops_per_token_sq: float = Field(
        default=0.0, ge=0, description="Forward attention FLOPs per token squared (4 x width x layers)."
    )
    hidden_size: int | None = Field(
        default=None, ge=1, description="Width of the residual stream: what a parallel mode exchanges per token.")
    attention_heads: int | None = Field(
        default=None, ge=1, description="Attention heads: a tensor-parallel degree must divide them.")
    tensor_parallel_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="Share of the parameters diffusers' ``_tp_plan`` shards (the rest is on every rank), counted "
                    "on the meta device.")

    @property
    def quantized(self) -> bool:
        return self.stored_dtype in ("int4", "fp4")

    def weight_bytes(self, compute_dtype: str) -> float:
        """Bytes of weights on the device when loaded with ``compute_dtype`` ('bf16', 'fp16', 'fp32')."""
        if self.weights_gb is not None:
            return self.weights_gb * 1e9
        dtype = self.stored_dtype if self.quantized else compute_dtype
        return self.params_b * 1e9 * BYTES_PER_PARAM[dtype]

    def streamed_bytes(self, compute_dtype: str) -> float:
        """Bytes resident at once under per-block / sequential offload: one block or the largest module."""
        total = self.weight_bytes(compute_dtype)
        per_param = total / (self.params_b * 1e9)
        largest = max(self.params_b / self.num_blocks, self.largest_module_params_b)
        return largest * 1e9 * per_param


class WeightsSource(_Strict):
    hub_repo: str | None = Field(default=None, description="Hugging Face repo id of the diffusers pipeline.")
    local_path: str | None = Field(default=None, description="Local folder in the diffusers layout.")
    transformer_repo: str | None = Field(default=None, description="Repo of the nunchaku 4-bit transformer.")
    transformer_file: str | None = Field(default=None, description="File of the 4-bit transformer in that repo.")
    revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$",
        description="Commit of hub_repo that is downloaded and loaded; null follows the repo's main branch.")
    transformer_revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$", description="Commit of transformer_repo, likewise.")
    lora_repo: str | None = Field(
        default=None, description="Repo of a LoRA fused into the transformer at load (a Lightning distillation).")
    lora_file: str | None = Field(default=None, description="File of that LoRA in its repo (a path in the repo).")
    lora_revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$", description="Commit of lora_repo, likewise.")
    lora_scale: float = Field(default=1.0, gt=0, description="Scale the LoRA is fused with.")
    download_gb: float | None = Field(default=None, gt=0, description="What a first download fetches, in GB.")


class InferenceDefaults(_Strict):
    num_inference_steps: int = Field(ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, description="Z-Image CFG scale (0 = off).")
    true_cfg_scale: float | None = Field(default=None, ge=0, description="Qwen edit CFG (> 1 with a negative prompt).")
    negative_prompt: str | None = None
    width: int = Field(default=1024, ge=16)
    height: int = Field(default=1024, ge=16)
    quality_steps: dict[Literal["low", "medium", "high"], int] = Field(
        default_factory=dict,
        description="Denoising steps per OpenAI quality (low, medium, high); a missing one: the default steps.")


class ModelVariant(_Strict):
    """One servable model variant: a pipeline, its weights, precision, defaults and hardware needs."""

    id: str
    task: Task | None = Field(default=None, description="Deprecated: the pipeline's family says which tasks a "
                                                       "variant serves; when given, one of them.")
    base_model: str = Field(description="Model family, e.g. 'z-image-turbo', 'qwen-image-edit-2511'.")
    pipeline: str = Field(description="The diffusers pipeline class: a family of serve_app/domain/families.py.")
    precision: Precision
    svdq_rank: int | None = Field(default=None, description="SVDQuant low-rank branch rank (4-bit only).")
    lightning_steps: int | None = Field(default=None, description="Steps a fused Lightning LoRA was distilled for.")
    source: WeightsSource
    components: dict[str, ComponentSpec]
    min_compute_capability: str | None = Field(default=None, description="Lowest sm this variant runs on.")
    compute_capabilities: list[str] | None = Field(default=None, description="Exact sms this variant runs on.")
    requires_nunchaku: bool = False
    max_input_images: int = Field(default=0, ge=0, le=3)
    min_side: int = Field(default=64, ge=16)
    max_side: int = Field(default=2048, ge=16)
    min_inference_steps: int = Field(default=1, ge=1, description="Fewest denoising steps the scheduler can run.")
    scheduler_overrides: dict[str, Any] = Field(default_factory=dict)
    defaults: InferenceDefaults

    @field_validator("pipeline")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"no pipeline family {value!r}; known: {', '.join(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelVariant:
        if self.task is not None and self.task not in self.tasks:
            raise ValueError(f"{self.id}: pipeline {self.pipeline} serves {', '.join(self.tasks)}, not {self.task}")
        if "edit" in self.tasks and self.max_input_images < 1:
            raise ValueError(f"{self.id}: an edit variant takes at least one input image")
        if "edit" not in self.tasks and self.max_input_images:
            raise ValueError(f"{self.id}: a generate variant takes no input images")
        if set(self.components) != {"transformer", "text_encoder", "vae"}:
            raise ValueError(f"{self.id}: components must be transformer, text_encoder and vae")
        if self.precision in ("int4", "fp4"):
            if not self.requires_nunchaku or self.svdq_rank is None:
                raise ValueError(f"{self.id}: 4-bit variants are nunchaku SVDQuant: "
                                 "set requires_nunchaku and svdq_rank")
            if self.base_model == "qwen-image-edit-2511":
                # nunchaku's Qwen forward ignores zero_cond_t, and no official build exists (nunchaku#832).
                raise ValueError(f"{self.id}: Qwen-Image-Edit-2511 has no 4-bit (nunchaku) variant")
            if self.source.transformer_file is None:
                raise ValueError(f"{self.id}: 4-bit variants need source.transformer_file")
        if (self.source.lora_repo is None) != (self.source.lora_file is None):
            raise ValueError(f"{self.id}: a fused LoRA needs both source.lora_repo and source.lora_file")
        if self.source.lora_file is not None and self.requires_nunchaku:
            raise ValueError(f"{self.id}: a LoRA is fused into a bf16 transformer; nunchaku ships its Lightning "
                             "builds fused already")
        for steps in (self.defaults.num_inference_steps, *self.defaults.quality_steps.values()):
            if steps < self.min_inference_steps:
                raise ValueError(f"{self.id}: {steps} steps (a default or quality preset) is below "
                                 f"min_inference_steps {self.min_inference_steps}")
        for cc in [self.min_compute_capability, *(self.compute_capabilities or [])]:
            if cc is not None:
                parse_compute_capability(cc)
        return self

    @property
    def family(self) -> PipelineFamily:
        return family_of(self.pipeline)

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The routes this variant serves (its pipeline family's)."""
        return self.family.tasks

    @property
    def transformer(self) -> ComponentSpec:
        return self.components["transformer"]

    def runs_cfg(self, guidance_scale: float | None = None, true_cfg_scale: float | None = None,
                 negative_prompt: str | None = None) -> bool:
        """Whether the pipeline runs classifier-free guidance (two transformer passes per step) for these settings
        (the variant's defaults where None), by its family's rule (``PipelineFamily.cfg_knob``)."""
        d = self.defaults
        if self.family.cfg_knob == "guidance_scale":
            scale = d.guidance_scale if guidance_scale is None else guidance_scale
            return (scale or 0) > 0
        scale = d.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        negative = d.negative_prompt if negative_prompt is None else negative_prompt
        return (scale or 0) > 1 and negative is not None

    def steps_for(self, num_inference_steps: int | None = None, quality: str | None = None) -> int:
        """Denoising steps of a request: its own, else its quality's preset, else the default."""
        if num_inference_steps is not None:
            return num_inference_steps
        return self.defaults.quality_steps.get(quality or "auto", self.defaults.num_inference_steps)

    def total_params_b(self) -> float:
        return sum(c.params_b for c in self.components.values())

    def weight_bytes(self, compute_dtype: str) -> float:
        """Bytes of every component's weights loaded with ``compute_dtype`` ('bf16', 'fp32', ...)."""
        return sum(c.weight_bytes(compute_dtype) for c in self.components.values())


class Catalog(_Strict):
    gpus: dict[str, GPUClass]
    variants: dict[str, ModelVariant]
    aliases: dict[str, list[str]]

    @model_validator(mode="after")
    def _aliases_point_to_variants(self) -> Catalog:
        for alias, targets in self.aliases.items():
            missing = [t for t in targets if t not in self.variants]
            if missing or not targets:
                raise ValueError(f"alias {alias!r} names unknown variants {missing}")
        return self

    def variant(self, name: str) -> ModelVariant:
        try:
            return self.variants[name]
        except KeyError:
            raise KeyError(f"unknown model variant {name!r}; known: {', '.join(sorted(self.variants))}") from None

    def gpu(self, name: str) -> GPUClass:
        """Look a GPU class up by id, name or device name as nvidia-smi prints it, case-insensitively
        ('rtx-4090', 'RTX 4090', 'NVIDIA GeForce RTX 4090')."""
        wanted = " ".join(name.split()).lower()
        for gpu in self.gpus.values():
            if wanted in (gpu.id.lower(), gpu.name.lower(), *(n.lower() for n in gpu.nvidia_smi_names)):
                return gpu
        raise KeyError(f"unknown GPU class {name!r}; known: {', '.join(sorted(self.gpus))}")

    def match_gpu_name(self, device_name: str) -> GPUClass | None:
        """The catalog GPU whose name appears in a CUDA device name ('NVIDIA GeForce RTX 4090')."""
        return match_gpu_name(self.gpus.values(), device_name)

    def candidates(self, name: str) -> list[ModelVariant]:
        """Variants a requested model name may mean: an alias's list (preferred first) or one variant.

        A name that is both an alias and a variant id resolves as the alias, whose first
        choice is that same variant; the others are fallbacks where it cannot be served.
        """
        if name in self.aliases:
            return [self.variants[v] for v in self.aliases[name]]
        return [self.variant(name)]

    def names(self) -> list[str]:
        return sorted(set(self.variants) | set(self.aliases))


def match_gpu_name(gpus: Iterable[GPUClass], device_name: str) -> GPUClass | None:
    """The GPU class of a CUDA device name ('NVIDIA GeForce RTX 4090').

    First the classes' nvidia-smi names, exactly; then, for a card the table lacks, a class name that
    stands as whole words in the device name, the longest winning (so 'NVIDIA L40' is no L4, and
    'NVIDIA RTX 4000 Ada Generation' is the RTX 4000 Ada, not an 'RTX 4000').
    """
    gpus = list(gpus)
    wanted = " ".join(device_name.split()).lower()
    for gpu in gpus:
        if wanted in (n.lower() for n in gpu.nvidia_smi_names):
            return gpu
    hits = [g for g in gpus
            if re.search(rf"(?<![a-z0-9]){re.escape(g.name.lower())}(?![a-z0-9])", wanted)]
    return max(hits, key=lambda g: len(g.name)) if hits else None


def _resolve_components(raw: dict[str, Any]) -> dict[str, Any]:
    shared = raw.get("components", {})
    variants = []
    for variant in raw.get("variants", []):
        variant = dict(variant)
        resolved = {}
        for role, spec in (variant.get("components") or {}).items():
            if isinstance(spec, str):
                if spec not in shared:
                    raise ValueError(f"variant {variant.get('id')!r}: unknown component {spec!r}")
                spec = {"traced_module": spec, **shared[spec]}
            resolved[role] = spec
        variant["components"] = resolved
        variants.append(variant)
    return {
        "gpus": {g["id"]: g for g in raw.get("gpus", [])},
        "variants": {v["id"]: v for v in variants},
        "aliases": raw.get("aliases", {}),
    }


def merge_catalog_data(base: dict[str, Any], extension: dict[str, Any] | None) -> dict[str, Any]:
    """Overlay a user's ``catalog:`` section on the raw built-in data (entries with the same id replace)."""
    if not extension:
        return base
    merged = copy.deepcopy(base)
    for key in ("gpus", "variants"):
        by_id = {item["id"]: item for item in merged.get(key, [])}
        for item in extension.get(key, []) or []:
            by_id[item["id"]] = item
        merged[key] = list(by_id.values())
    merged.setdefault("components", {}).update(extension.get("components", {}) or {})
    merged.setdefault("aliases", {}).update(extension.get("aliases", {}) or {})
    return merged


@lru_cache(maxsize=1)
def builtin_catalog_data() -> dict[str, Any]:
    return yaml.safe_load(CATALOG_PATH.read_text())


def build_catalog(extension: dict[str, Any] | None = None) -> Catalog:
    """The built-in catalog, overlaid with a user's extension (raw YAML data) if given."""
    raw = merge_catalog_data(copy.deepcopy(builtin_catalog_data()), extension)
    return Catalog.model_validate(_resolve_components(raw))


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    return build_catalog()
