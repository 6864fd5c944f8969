"""Multi-GPU replicas: the parallel modes one request can run in across GPUs of one node, what each holds per
GPU, and what an image costs in seconds.

A mode is diffusers 0.42.1's own parallelism, applied to the transformer (the text encoder and the VAE run
whole on every rank; with ``model`` offload each component, the transformer's share too, is on the GPU only
for its stage):

* ``cp<N>``, context parallel (Ulysses): every rank holds all the transformer's weights and 1/N of the
  sequence; each attention layer exchanges its queries, keys, values and output by all-to-all.
* ``tp<N>``, tensor parallel: every rank holds 1/N of each Linear in diffusers' ``_tp_plan`` (for
  Qwen-Image 66.5% of the parameters; the AdaLN modulation stays whole on every rank) and all the tokens;
  each block all-reduces its attention and MLP outputs, once per stream.

Communication is priced from the catalog's ``peer_link`` of the GPU class (NVLink, PCIe peer-to-peer, or
staged through host memory where GeForce cards have no peer access). Compute divides by N, which is the best
case: small per-rank matrices run below the calibrated efficiency, so a planned figure is a lower bound that
``bench/gpu_fullsize.py --parallel`` replaces with a measurement.

Plain Python over the catalog and the planner; nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.domain.calibration import Calibration, default_calibration
from serve_app.domain.catalog import GIB, GPUClass, ModelVariant
from serve_app.domain.planner import (
    DTYPE_SHORT,
    EstimatePart,
    OffloadMode,
    Plan,
    PlannerSettings,
    estimate_seconds,
    request_shape,
    stage_activations,
)
from serve_app.domain.shapes import transformer_tokens

ParallelKind = Literal["cp", "tp"]
PARALLEL_KINDS: tuple[ParallelKind, ...] = ("cp", "tp")
PARALLEL_DEGREES = (2, 4, 8)
PARALLEL_MODE_PATTERN = r"^(cp|tp)(2|4|8)$"
# Offload modes a parallel replica may load with: every component resident, or one at a time on the GPU
# (diffusers' model offload, the transformer's share moved in for the denoising and out for the VAE). Sequential
# offload would stream the transformer's share every step, which is what a multi-GPU replica exists to avoid.
PARALLEL_OFFLOAD_MODES: tuple[OffloadMode, ...] = ("none", "model")
# NCCL's buffers per peer (est.): NCCL_BUFFSIZE 4 MiB per channel, up to 32 channels, send and receive.
COLLECTIVE_BUFFERS_GIB_PER_PEER = 2 * 32 * 4 / 1024


@dataclass(frozen=True)
class ParallelMode:
    """``cp2``, ``tp4``, ...: a kind of parallelism over ``degree`` GPUs of one node."""

    kind: ParallelKind
    degree: int

    @classmethod
    def parse(cls, text: str) -> ParallelMode:
        match = re.match(PARALLEL_MODE_PATTERN, text)
        if match is None:
            raise ValueError(f"parallel mode {text!r}: expected cp or tp followed by 2, 4 or 8 (cp2, tp4, ...)")
        return cls(match.group(1), int(match.group(2)))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}{self.degree}"

    @property
    def name(self) -> str:
        return {"cp": "context parallel (Ulysses)", "tp": "tensor parallel"}[self.kind]


def parallel_problem(variant: ModelVariant, mode: ParallelMode, gpu: GPUClass | None = None,
                     gpus_per_node: int | None = None) -> str | None:
    """Why ``variant`` cannot run in ``mode`` (on ``gpu``, on nodes of ``gpus_per_node``), or None."""
    family, transformer = variant.family, variant.transformer
    if variant.requires_nunchaku:
        return (f"{variant.id}: nunchaku's 4-bit transformer is not a diffusers model, and diffusers' parallelism "
                "does not reach it")
    if variant.precision == "fp8":
        return (f"{variant.id}: torchao's fp8 weights are untried under diffusers' sharding and context-parallel "
                "hooks")
    if mode.kind == "cp" and not family.context_parallel:
        return f"{variant.id}: {family.pipeline}'s transformer has no context-parallel plan"
    if mode.kind == "tp" and (not family.tensor_parallel or not transformer.tensor_parallel_fraction):
        return f"{variant.id}: {family.pipeline}'s transformer has no tensor-parallel plan the catalog counts"
    if mode.kind == "tp" and transformer.attention_heads and transformer.attention_heads % mode.degree:
        return (f"{variant.id}: tp{mode.degree} must divide the transformer's {transformer.attention_heads} "
                "attention heads")
    if gpus_per_node is not None and mode.degree > gpus_per_node:
        return f"{mode} needs {mode.degree} GPUs of one node; the node has {gpus_per_node}"
    if gpu is not None and gpu.unified_memory:
        return f"{gpu.name} comes one to a machine"
    return None


class ParallelSeconds(BaseModel):
    """Seconds for one image in a parallel mode, with its parts."""

    total_s: float
    denoise_s: float = Field(description="The one-GPU denoising time divided by the degree (a lower bound).")
    communication_s: float = Field(description="Exchanged bytes over the peer link, every forward.")
    other_s: float = Field(description="Text encoding, VAE and the pipeline around them, as on one GPU.")
    offload_s: float = Field(description="Moving each component to the GPU for its stage, once per image (model).")
    exchanged_gb_per_forward: float = Field(description="What one rank sends per transformer forward, GB.")
    link_gbps: float = Field(description="The peer link's effective rate per direction, GB/s.")
    link: str = Field(description="Which link, and where its figure comes from.")
    forwards: int


class ParallelPlan(BaseModel):
    """The planner's verdict for one (variant, GPU class, parallel mode) on one node."""

    gpu: str
    variant: str
    mode: str = Field(description="cp2, tp4, ...")
    degree: int
    offload_mode: OffloadMode | None = Field(description="The first of PARALLEL_OFFLOAD_MODES that fits; null when "
                                                         "none does.")
    fits: bool
    peak_vram_gib: float | None = Field(description="Per GPU, in the chosen offload mode (or the lightest tried).")
    usable_vram_gib: float
    peak_stage: str | None = None
    parts: list[EstimatePart] = Field(default_factory=list, description="What the per-GPU peak is made of.")
    seconds: ParallelSeconds | None = None
    reason: str | None = None

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds.total_s if self.seconds else None

    @property
    def gpu_seconds_per_image(self) -> float | None:
        """GPU time an image takes: what a node's throughput is divided by."""
        return self.seconds.total_s * self.degree if self.seconds else None


def estimate_parallel_vram(
    variant: ModelVariant, mode: ParallelMode, offload: OffloadMode, width: int, height: int, num_input_images: int,
    torch_dtype: str = "bfloat16", settings: PlannerSettings | None = None, batch_size: int = 1,
    calibration: Calibration | None = None,
) -> tuple[float, str, list[EstimatePart]]:
    """Peak GiB on each GPU of a ``mode`` replica, the stage where it peaks, and its parts.

    Activations: context parallel holds 1/N of the transformer's (its sequence share); tensor parallel is
    counted with all of them (the residual stream and each block's gathered outputs are whole on every rank).
    """
    settings = settings or PlannerSettings()
    calibration = calibration or default_calibration()
    fit = calibration.memory
    dtype = DTYPE_SHORT[torch_dtype]
    activations = stage_activations(variant, width, height, num_input_images, batch_size,
                                    variant.runs_cfg() and variant.family.cfg_in_batch, calibration)
    weights = {role: c.weight_bytes(dtype) / GIB for role, c in variant.components.items()}
    transformer = weights["transformer"]
    if mode.kind == "tp":
        share = variant.transformer.tensor_parallel_fraction
        transformer *= (1 - share) + share / mode.degree
        shard_detail = (f"1/{mode.degree} of the {share:.1%} diffusers' _tp_plan shards, the rest whole")
    else:
        shard_detail = "all of it on every rank"
    others = weights["text_encoder"] + weights["vae"]
    stages: dict[str, tuple[float, float]] = {}  # role -> (weights resident, activations)
    for role, (gib, _source, _detail) in activations.items():
        act = gib / mode.degree if role == "transformer" and mode.kind == "cp" else gib
        own = transformer if role == "transformer" else weights[role]
        stages[role] = (transformer + others if offload == "none" else own, act)
    peak_stage = max(stages, key=lambda r: sum(stages[r]))
    resident, act = stages[peak_stage]
    context = fit.cuda_context_gib.value if settings.cuda_context_gib is None else settings.cuda_context_gib
    overhead = fit.resident_overhead_gib if offload == "none" else fit.model_offload_overhead_gib
    buffers = COLLECTIVE_BUFFERS_GIB_PER_PEER * (mode.degree - 1)
    shard = transformer if peak_stage == "transformer" or offload == "none" else 0.0
    parts = [
        EstimatePart(name="transformer share", gib=shard, source="catalog",
                     detail=shard_detail if shard else "on the host while the other stages run (model offload)"),
        EstimatePart(name="other weights", gib=resident - shard, source="catalog",
                     detail="text encoder and VAE resident" if offload == "none"
                     else f"the {peak_stage} alone (model offload)"),
        EstimatePart(name=f"{peak_stage} activations", gib=act, source=activations[peak_stage][1],
                     detail=activations[peak_stage][2] + (f", 1/{mode.degree} of the sequence"
                                                          if mode.kind == "cp" and peak_stage == "transformer"
                                                          else "")),
        EstimatePart(name="allocator reserve", gib=fit.reserve_fraction.value * act, source="fitted",
                     detail=f"{fit.reserve_fraction.value:.2f} x the peak stage's activations"),
        EstimatePart(name="CUDA context", gib=context, source="fitted", detail=fit.cuda_context_gib.description),
        EstimatePart(name=f"{offload} mode overhead", gib=overhead.value, source="fitted", detail=overhead.description),
        EstimatePart(name="collective buffers", gib=buffers, source="catalog",
                     detail=f"est.: NCCL_BUFFSIZE 4 MiB x 32 channels x send and receive, per peer "
                            f"({mode.degree - 1})"),
    ]
    peak = sum(part.gib for part in parts)
    return round(peak, 2), peak_stage, [p.model_copy(update={"gib": round(p.gib, 3)}) for p in parts]


def exchanged_bytes_per_forward(variant: ModelVariant, mode: ParallelMode, tokens: float,
                                bytes_per_value: int = 2) -> float:
    """Bytes one rank sends per transformer forward.

    Context parallel (Ulysses): per block, an all-to-all of queries, keys, values and of the attention output,
    each ``tokens/N x hidden`` values of which (N-1)/N leave the rank. Tensor parallel: per block, an all-reduce
    of the attention output and of the MLP output over all tokens; a ring all-reduce sends 2(N-1)/N of it.
    """
    t = variant.transformer
    row = (t.hidden_size or 0) * bytes_per_value
    n = mode.degree
    if mode.kind == "cp":
        return t.num_blocks * 4 * (tokens / n) * row * (n - 1) / n
    return t.num_blocks * 2 * tokens * row * 2 * (n - 1) / n


def effective_link_gbps(gpu: GPUClass, settings: PlannerSettings) -> tuple[float, str]:
    """The peer link's rate a collective reaches, and what it is: staged through the host, every byte crosses
    the host link twice."""
    link = gpu.peer
    rate = link.gbps * settings.peer_link_efficiency / (2 if link.kind == "via-host" else 1)
    return rate, f"{link.kind} {link.gbps:g} GB/s x {settings.peer_link_efficiency:g}" + (
        " / 2 (through host memory)" if link.kind == "via-host" else "") + f": {link.source}"


def estimate_parallel_seconds(
    variant: ModelVariant, gpu: GPUClass, mode: ParallelMode, offload: OffloadMode = "none",
    width: int | None = None, height: int | None = None, num_input_images: int | None = None,
    num_inference_steps: int | None = None, settings: PlannerSettings | None = None,
    calibration: Calibration | None = None,
) -> ParallelSeconds:
    """Seconds per image: the one-GPU denoising over N, the exchanged bytes over the peer link, and the rest as on
    one GPU, plus moving every component in once per image under ``model`` offload."""
    settings = settings or PlannerSettings()
    width, height, num_input_images = request_shape(variant, width, height, num_input_images)
    one = estimate_seconds(variant, gpu, "none", width, height, num_input_images, num_inference_steps,
                           settings=settings, calibration=calibration)
    sent = exchanged_bytes_per_forward(variant, mode, transformer_tokens(width, height, num_input_images))
    rate, link = effective_link_gbps(gpu, settings)
    communication = one.forwards * sent / (rate * 1e9)
    moving = 0.0
    if offload == "model":  # every component comes in once per image; the transformer only its share
        transformer = variant.transformer
        share = transformer.tensor_parallel_fraction if mode.kind == "tp" else 0.0
        moved = sum(c.weight_bytes("bf16") for c in variant.components.values())
        moved -= transformer.weight_bytes("bf16") * share * (1 - 1 / mode.degree)
        moving = moved / (settings.host_to_device_gbps * 1e9)
    denoise = one.denoise_s / mode.degree
    return ParallelSeconds(
        total_s=round(denoise + communication + one.other_s + moving, 3), denoise_s=round(denoise, 3),
        communication_s=round(communication, 3), other_s=one.other_s, offload_s=round(moving, 3),
        exchanged_gb_per_forward=round(sent / 1e9, 3), link_gbps=round(rate, 2), link=link, forwards=one.forwards)


def plan_parallel_mode(
    variant: ModelVariant, gpu: GPUClass, mode: ParallelMode, width: int | None = None, height: int | None = None,
    num_input_images: int | None = None, gpus_per_node: int | None = None, settings: PlannerSettings | None = None,
    batch_size: int = 1, calibration: Calibration | None = None,
    offload_modes: tuple[OffloadMode, ...] = PARALLEL_OFFLOAD_MODES,
) -> ParallelPlan:
    """Whether ``variant`` runs in ``mode`` on GPUs of ``gpu``'s class: the first offload mode (resident first)
    whose per-GPU peak fits."""
    settings = settings or PlannerSettings()
    width, height, num_input_images = request_shape(variant, width, height, num_input_images)
    usable = round(gpu.vram_gib - settings.margin_gib(gpu.vram_gib), 2)
    base = dict(gpu=gpu.id, variant=variant.id, mode=str(mode), degree=mode.degree, usable_vram_gib=usable)
    if (problem := parallel_problem(variant, mode, gpu, gpus_per_node)) is not None:
        return ParallelPlan(offload_mode=None, fits=False, peak_vram_gib=None, reason=problem, **base)
    lightest: tuple[float, str, list[EstimatePart]] | None = None
    for offload in offload_modes:
        if offload not in PARALLEL_OFFLOAD_MODES:
            continue
        peak, stage, parts = estimate_parallel_vram(variant, mode, offload, width, height, num_input_images,
                                                    settings=settings, batch_size=batch_size, calibration=calibration)
        if peak <= usable:
            seconds = estimate_parallel_seconds(variant, gpu, mode, offload, width, height, num_input_images,
                                                settings=settings, calibration=calibration)
            return ParallelPlan(offload_mode=offload, fits=True, peak_vram_gib=peak, peak_stage=stage, parts=parts,
                                seconds=seconds, **base)
        if lightest is None or peak < lightest[0]:
            lightest = (peak, stage, parts)
    if lightest is None:
        return ParallelPlan(offload_mode=None, fits=False, peak_vram_gib=None, reason="no offload mode allowed "
                            f"here runs in parallel ({', '.join(PARALLEL_OFFLOAD_MODES)} do)", **base)
    peak, stage, parts = lightest
    return ParallelPlan(offload_mode=None, fits=False, peak_vram_gib=peak, peak_stage=stage, parts=parts,
                        reason=f"needs ~{peak:.1f} GiB per GPU ({stage} stage), {gpu.name} has {usable:.1f} usable",
                        **base)


def parallel_modes(gpus_per_node: int) -> list[ParallelMode]:
    """Every mode a node of ``gpus_per_node`` GPUs can hold, smallest degree first."""
    return [ParallelMode(kind, degree) for degree in PARALLEL_DEGREES if degree <= gpus_per_node
            for kind in PARALLEL_KINDS]


def plan_parallel(
    variant: ModelVariant, gpu: GPUClass, gpus_per_node: int, width: int | None = None, height: int | None = None,
    num_input_images: int | None = None, settings: PlannerSettings | None = None, batch_size: int = 1,
    calibration: Calibration | None = None,
) -> list[ParallelPlan]:
    """Every parallel mode of a node of ``gpus_per_node`` ``gpu``s for one request shape."""
    return [plan_parallel_mode(variant, gpu, mode, width, height, num_input_images, gpus_per_node, settings,
                               batch_size, calibration) for mode in parallel_modes(gpus_per_node)]


def choose_parallel(one_gpu: Plan, plans: list[ParallelPlan]) -> ParallelPlan | None:
    """The parallel mode placement serves, or None for one-GPU replicas.

    One GPU wins wherever it fits without streaming weights every step (resident or model offload): N one-GPU
    replicas serve more traffic than one N-GPU replica. Otherwise the mode that fits and beats one GPU with the
    least GPU time per image (the node's throughput), the fewer GPUs on a tie.
    """
    if one_gpu.fits and one_gpu.mode in ("none", "model"):
        return None
    better = [p for p in plans if p.fits and p.seconds is not None
              and (not one_gpu.fits or one_gpu.seconds_per_image is None
                   or p.seconds.total_s < one_gpu.seconds_per_image)]
    return min(better, key=lambda p: (p.gpu_seconds_per_image, p.degree), default=None)
