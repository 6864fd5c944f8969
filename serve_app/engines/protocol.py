"""What a model replica needs from a pipeline: the ``ImageEngine`` protocol and the types it speaks.

A replica hands its engine *jobs* (one request each, already validated and sized by the router),
in batches of jobs that share the engine's ``batch_key``; the engine runs them as few pipeline
calls as it can and returns one ``EngineResult`` per job. An unbatched request is a batch of one.
The families (``z_image``, ``qwen_image_edit``) implement it on diffusers pipelines; the test
doubles of ``gpu_doubles`` wrap them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.planner import OffloadMode
from serve_app.domain.schemas import EditRequest, GenerateRequest, StageTimings


class ModelLoadError(RuntimeError):
    """A variant could not be loaded; the message says why and what to do."""


class IncompatibleHardwareError(ModelLoadError):
    """The variant cannot run on this device (architecture, VRAM, or no GPU for 4-bit)."""


class GenerationCancelled(RuntimeError):
    """Every caller of a pipeline call went away; denoising stopped early and no image is returned."""


class EngineOutOfMemory(RuntimeError):
    """The device ran out of memory during a call. The engine is intact: once the failed call's tensors are
    released, the next call can run."""


class DeviceFault(RuntimeError):
    """A device error that leaves the CUDA context unusable (an illegal access, a device-side assert, ECC): no
    call can run in this process again."""


class RankFailure(DeviceFault):
    """A rank of a multi-GPU engine died, or stayed silent past the collective timeout: the ranks' process group
    is broken, and no call can run on it again."""


def engine_failure(err: BaseException) -> BaseException:
    """What a raw failure of an engine call is: ``EngineOutOfMemory``, ``DeviceFault``, or ``err`` itself.

    Out of memory first: torch raises ``torch.OutOfMemoryError``, and nunchaku words it "CUDA error: out of
    memory", which is no fault of the CUDA context. Any other "CUDA error" (or a device-side assert) is one.
    """
    if isinstance(err, (EngineOutOfMemory, DeviceFault)) or not isinstance(err, (RuntimeError, MemoryError)):
        return err
    import torch

    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return EngineOutOfMemory(text)
    if isinstance(err, RuntimeError) and ("CUDA error" in text or "device-side assert" in text):
        return DeviceFault(text)
    return err


@dataclass
class Job:
    """One request as a replica runs it: the request, its resolved size and steps, and whether its
    caller is still waiting."""

    request: GenerateRequest | EditRequest
    width: int
    height: int
    num_inference_steps: int
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Streams: after each of these 0-based denoising steps, ``on_preview(step, first_image, previews)`` gets
    # (h, w, 3) float previews in [0, 1] at latent resolution of images first_image, first_image + 1, ...
    # (called on the pipeline's thread).
    preview_steps: Sequence[int] = ()
    on_preview: Callable[[int, int, list[np.ndarray]], None] | None = None
    # A batch line: run only while no interactive request waits, and stopped (then requeued) when one arrives.
    background: bool = False

    @property
    def images(self) -> int:
        """Output images the job asks for (its size in a batch)."""
        return self.request.n


@dataclass
class EngineResult:
    """One job's outcome.

    Attributes:
        images: the output images, ``n`` of them, as the pipeline hands them back: (H, W, 3) float arrays
            in [0, 1] (``serve_app.domain.images.to_uint8`` / ``to_pil`` convert them). Encoding is the
            replica's business, off the thread that drives the GPU.
        seeds: the seed of each image.
        timings: seconds per stage (``text_encode_s``, ``vae_encode_s``, ``denoise_s``,
            ``vae_decode_s``, ``total_s``) of the pipeline call(s) that made the images.
        steps: denoising steps run.
        batch_images: images computed in the same pipeline call as these.
        denoised_images: images whose denoising ``timings["denoise_s"]`` covers (for per-step time).
    """

    images: list[np.ndarray | Image.Image]
    seeds: list[int]
    timings: StageTimings = field(default_factory=dict)
    steps: int = 0
    batch_images: int = 1
    denoised_images: int = 1
    prompt_tokens: int = 0


@dataclass(frozen=True)
class EngineInfo:
    """How an engine was loaded."""

    device: str
    torch_dtype: str
    offload_mode: OffloadMode
    load_seconds: float
    planned_peak_gib: float | None = None
    source: str | None = None


@dataclass(frozen=True)
class LoraState:
    """An engine's per-request LoRAs: the names loaded now, and how often a call activated one since the engine
    loaded, by outcome (``hit``: loaded already, ``load``, ``hotswap``)."""

    loaded: tuple[str, ...] = ()
    uses: Mapping[str, int] = field(default_factory=dict)


@runtime_checkable
class ImageEngine(Protocol):
    """A loaded variant that runs batches of jobs. Calls come from one worker thread at a time."""

    variant: ModelVariant
    info: EngineInfo

    def warm_up(self) -> None:
        """Run one tiny call so the first request pays no first-call costs."""

    def batch_key(self, job: Job) -> Hashable:
        """Jobs with equal keys may run as one pipeline call."""

    def park(self) -> int:
        """Drop the weights' GPU copy, keeping them in host RAM; returns the bytes the GPU freed (0 when
        nothing was on it: CPU, or an offload mode that keeps weights on the host between calls)."""

    def unpark(self) -> int:
        """Put parked weights back on the GPU from host RAM (never the disk); returns the bytes copied."""

    def lora_state(self) -> LoraState:
        """The per-request LoRAs loaded, and their activations so far."""

    def reset_peak_memory(self) -> None:
        """Start a new reading of the device memory peak (nothing on CPU)."""

    def peak_memory_bytes(self) -> int | None:
        """The most device memory allocated since ``reset_peak_memory`` (None on CPU)."""

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        """Run ``jobs`` (equal batch keys) and return one result per job, in order.

        ``should_stop`` is polled after every denoising step; once it returns True the engine stops
        and raises ``GenerationCancelled``. A call that runs out of device memory raises ``EngineOutOfMemory``,
        one that breaks the device ``DeviceFault`` (``engine_failure`` says which a raw error is).
        """
