"""One GPU, several variants: what may stay on the GPU together, what a swap costs, and what runs next.

A swap group (``swap_groups:`` in the config) is a set of variants that share every GPU of one
deployment. Each variant's weights are loaded from disk once and kept in host RAM; the active variant's
are also on the GPU. A swap drops the GPU copy of the variants that must leave (their host copy stays, so
leaving costs nothing) and copies the incoming variant's weights from host RAM to the GPU: no disk read.

``plan_swap_group`` decides, for one GPU class, whether the variants fit the GPU all at once (then they
never swap), or each alone (then they take turns), and whether host RAM holds every variant's weights; it
refuses a group that cannot work, and says why. It also puts a price on a swap (the weights the incoming
variant keeps on the GPU, over the host link) against a cold start (every weight, from disk).

``next_variant`` is the anti-thrash policy the replica's GPU arbiter applies each time the GPU frees up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from serve_app.domain.catalog import GIB, GPUClass, ModelVariant
from serve_app.domain.planner import DTYPE_SHORT, OFFLOAD_MODES, OffloadMode, PlannerSettings, plan


@dataclass(frozen=True)
class Waiting:
    """A variant with work waiting for the GPU."""

    variant: str
    oldest_arrival: float  # when its longest-waiting request arrived, on the arbiter's clock
    requests: int = 1


def next_variant(waiting: Sequence[Waiting], resident: frozenset[str] | set[str], resident_since: float,
                 now: float, max_wait_s: float) -> str:
    """The variant whose work runs next on a GPU that several variants share.

    The resident variants (those on the GPU now) keep it while they have work, so requests of one variant run
    as a group and swaps stay rare. A variant that is not resident takes the GPU when the resident ones have
    nothing waiting, or when its oldest request has waited ``max_wait_s`` and the resident variant has held
    the GPU at least that long: under steady mixed load the variants take turns of about ``max_wait_s``
    each, so a swap happens at most once per turn and no request waits much beyond a turn. Among equals the
    oldest request goes first.

    Args:
        waiting: every variant with work waiting (at least one).
        resident: variants whose weights are on the GPU now.
        resident_since: when the last swap made the resident set what it is.
        now: the same clock as the arrivals and ``resident_since``.
        max_wait_s: the turn length; 0 swaps as soon as another variant waits (first come, first served).
    """
    if not waiting:
        raise ValueError("next_variant needs at least one waiting variant")

    def oldest(candidates: Sequence[Waiting]) -> str:
        return min(candidates, key=lambda w: w.oldest_arrival).variant

    at_home = [w for w in waiting if w.variant in resident]
    away = [w for w in waiting if w.variant not in resident]
    if not at_home or not away:
        return oldest(at_home or away)
    starved = [w for w in away if now - w.oldest_arrival >= max_wait_s]
    if starved and now - resident_since >= max_wait_s:
        return oldest(starved)
    return oldest(at_home)


class SwapMember(BaseModel):
    """One variant of a swap group on one GPU class."""

    variant: str
    mode: OffloadMode = Field(description="Offload mode the variant runs in on this GPU, planned alone.")
    peak_vram_gib: float = Field(description="Its peak while it runs.")
    gpu_resident_gib: float = Field(
        description="Weights it keeps on the GPU between requests while active: all of them with no offload, none "
                    "under model or sequential offload (those keep their weights in host RAM and stream them).")
    host_gib: float = Field(description="Its weights in host RAM (every variant keeps a full host copy).")
    swap_in_s: float = Field(description="Seconds to copy its GPU-resident weights from host RAM to the GPU.")
    cold_start_s: float = Field(description="Seconds to read all its weights from disk (a new replica).")


class SwapPlan(BaseModel):
    """The planner's verdict for a swap group on one GPU class."""

    gpu: str
    fits: bool
    reason: str | None = Field(description="Why the group cannot work on this GPU, or null.")
    co_resident: bool = Field(description="Every variant fits the GPU at once: they never swap.")
    members: list[SwapMember]
    usable_vram_gib: float
    host_needed_gib: float = Field(description="Host RAM for every member's weights plus the reserve.")
    host_ram_gib: float | None = Field(description="Host RAM of the group's nodes (null: not checked).")
    link_gbps: float = Field(description="Host-to-GPU copy rate assumed for swaps (GB/s).")


def swap_link_gbps(gpu: GPUClass, settings: PlannerSettings) -> float:
    """The rate a pinned host-to-GPU copy reaches on this GPU's link."""
    return gpu.link_gbps * settings.host_link_efficiency


def plan_swap_group(
    variants: Sequence[ModelVariant],
    gpu: GPUClass,
    host_ram_gib: float | None,
    width: int | None = None,
    height: int | None = None,
    modes: Mapping[str, tuple[OffloadMode, ...]] | None = None,
    settings: PlannerSettings | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    torch_dtype: str = "bfloat16",
) -> SwapPlan:
    """Whether ``variants`` can share one ``gpu`` (swapping through host RAM), and at what cost.

    Args:
        host_ram_gib: RAM of the node; every variant's weights stay there. None skips the check.
        modes: variant id -> offload modes allowed (all when missing), fastest first.
        batch_sizes: variant id -> images per pipeline call (1 when missing).
    """
    settings = settings or PlannerSettings()
    modes, batch_sizes = modes or {}, batch_sizes or {}
    dtype = DTYPE_SHORT[torch_dtype]
    link = swap_link_gbps(gpu, settings)
    usable = round(gpu.vram_gib - settings.margin_gib(gpu.vram_gib), 2)
    members: list[SwapMember] = []
    problems: list[str] = []
    for variant in variants:
        verdict = plan(variant, gpu, width, height, modes=modes.get(variant.id, OFFLOAD_MODES), settings=settings,
                       batch_size=batch_sizes.get(variant.id, 1), torch_dtype=torch_dtype)
        if not verdict.fits:
            problems.append(f"{variant.id} does not fit {gpu.name} even alone: {verdict.reason}")
            continue
        weights = sum(c.weight_bytes(dtype) for c in variant.components.values())
        on_gpu = weights if verdict.mode == "none" else 0.0
        members.append(SwapMember(
            variant=variant.id, mode=verdict.mode, peak_vram_gib=verdict.peak_vram_gib,
            gpu_resident_gib=round(on_gpu / GIB, 2), host_gib=round(weights / GIB, 2),
            swap_in_s=round(on_gpu / (link * 1e9), 2),
            cold_start_s=round(weights / (settings.disk_read_gbps * 1e9), 1)))
    host_needed = round(sum(m.host_gib for m in members) + settings.host_reserve_gib, 1)
    if host_ram_gib is not None and host_needed > host_ram_gib:
        problems.append(
            f"host RAM: the members' weights ({', '.join(f'{m.variant} {m.host_gib:g}' for m in members)} GiB) "
            f"and a {settings.host_reserve_gib:g} GiB reserve need {host_needed:g} GiB, the node has "
            f"{host_ram_gib:g}; drop a member or use a node with more RAM")
    # Together: every member's resident weights at once, plus the largest working set one call adds on top.
    together = sum(m.gpu_resident_gib for m in members) + max(
        (m.peak_vram_gib - m.gpu_resident_gib for m in members), default=0.0)
    return SwapPlan(
        gpu=gpu.id, fits=not problems, reason="; ".join(problems) or None,
        co_resident=not problems and together <= usable, members=members, usable_vram_gib=usable,
        host_needed_gib=host_needed, host_ram_gib=host_ram_gib, link_gbps=round(link, 1))
