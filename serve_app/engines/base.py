"""What every diffusers engine shares: loading, per-image seeds, stage timing and cancellation.

Where weights come from and how they are placed is in loading.py, the speed options in optimizations.py,
and one call's state (stage timer, steps, stopping) in pipeline_call.py; this module puts them together.

Loading (``DiffusersEngine.load``) takes an ``EngineSpec``: it picks the device and the offload
mode the planner says fits the local GPU, finds the weights (a local folder or the offline Hugging
Face cache), loads the family's pipeline class with ``from_pretrained`` (with the real nunchaku's
4-bit transformer for 4-bit variants), then applies the scheduler overrides, the offload mode and
the configured speed options. The families add what only they need through ``extra_components``.

Running: a family builds the pipeline's arguments and calls ``self.pipe`` inside
``self.pipeline_call(...)``, which serializes calls, times the stages and stops denoising between
steps once the caller's ``should_stop`` says so.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.errors import UnsupportedValueError
from serve_app.domain.parallelism import ParallelMode
from serve_app.domain.schemas import MAX_SEED, LoraRequest, StageTimings
from serve_app.domain.specs import EngineSpec
from serve_app.engines.host_copies import HostCopies
from serve_app.engines.loading import (
    DTYPES,
    LoadTarget,
    apply_offload,
    fp8_placement,
    fp8_quantization,
    fuse_lora,
    holds_fp8_weights,
    resolve_source,
    weight_file,
)
from serve_app.engines.loras import LoraAdapters, lora_file
from serve_app.engines.optimizations import apply_optimizations
from serve_app.engines.parallel import context_parallel, tensor_parallel, tensor_parallel_config
from serve_app.engines.pipeline_call import PipelineCall, StageTimer
from serve_app.engines.previews import LatentPreviewer, fit_latent_rgb
from serve_app.engines.protocol import EngineInfo, EngineResult, Job, LoraState, ModelLoadError, engine_failure
from serve_app.engines.weights_io import prefetch, weight_files

logger = logging.getLogger(__name__)


class DiffusersEngine:
    """One loaded variant on a diffusers pipeline. Calls are serialized: pipelines are not thread-safe.

    Subclasses (one per model family) name their pipeline and nunchaku transformer classes and
    implement the ``ImageEngine`` protocol's ``warm_up``, ``batch_key`` and ``run``.
    """

    pipeline_class: ClassVar[str]
    nunchaku_transformer_class: ClassVar[str]
    # The keyword arguments the pipeline passes to its transformer (diffusers 0.42's call site):
    # a nunchaku transformer must take them all.
    transformer_call_keywords: ClassVar[frozenset[str]]

    def __init__(self, spec: EngineSpec, pipe, info: EngineInfo) -> None:
        self.spec = spec
        self.variant: ModelVariant = spec.variant
        self.pipe = pipe
        self.info = info
        self._lock = threading.Lock()
        self._timer = StageTimer(pipe, torch.cuda.synchronize if info.device == "cuda" else None)
        self._call: PipelineCall | None = None
        self._host_copies: HostCopies | None = None
        self.adapters: LoraAdapters | None = None  # per-request LoRAs, when the config lists some for this variant
        self._skip_decode_once_stopped()

    def _swapped_modules(self) -> list[torch.nn.Module]:
        return [c for c in self.pipe.components.values() if isinstance(c, torch.nn.Module)]

    def park(self) -> int:
        """``ImageEngine.park``. Only a pipeline whose weights stay on the GPU (offload mode none) has anything
        to move: model and sequential offload keep them in host RAM between calls already, and on CPU the
        host copy is the only copy."""
        if self.info.device == "cpu" or self.info.offload_mode != "none":
            return 0
        if self._host_copies is None:
            self._host_copies = HostCopies(self._swapped_modules(), pin=self.spec.pin_host_memory)
        return self._host_copies.park()

    def unpark(self) -> int:
        """``ImageEngine.unpark``: back onto the GPU from the host copies ``park`` kept."""
        if self._host_copies is None:
            return 0
        return self._host_copies.restore(self.info.device)

    def lora_state(self) -> LoraState:
        """``ImageEngine.lora_state``."""
        if self.adapters is None:
            return LoraState()
        return LoraState(tuple(self.adapters.loaded), dict(self.adapters.counts))

    def _on_cuda(self) -> bool:
        return self.info.device == "cuda" and torch.cuda.is_available()

    def reset_peak_memory(self) -> None:
        """``ImageEngine.reset_peak_memory``."""
        if self._on_cuda():
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int | None:
        """``ImageEngine.peak_memory_bytes``: torch's allocator peak on the device."""
        return torch.cuda.max_memory_allocated() if self._on_cuda() else None

    def _skip_decode_once_stopped(self) -> None:
        """A stopped call ends before the VAE decode: diffusers decodes the latents even after an
        interrupt, and nobody waits for that image any more."""
        decode = self.pipe.vae.decode

        def decode_unless_stopped(*args, **kwargs):
            call = self._call
            if call is not None and call.stopped:
                raise call.cancelled()
            return decode(*args, **kwargs)

        self.pipe.vae.decode = decode_unless_stopped

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EngineSpec, target: LoadTarget | None = None) -> DiffusersEngine:
        """Load ``spec.variant`` with ``from_pretrained`` as ``spec`` says, on ``target`` (this machine's,
        as ``LoadTarget.for_spec`` resolves it, when None)."""
        started = time.perf_counter()
        target = target or LoadTarget.for_spec(spec)
        if spec.source is None:
            raise ModelLoadError(f"{spec.variant.id}: no weights source configured")
        four_bit = spec.variant.requires_nunchaku
        folder = resolve_source(spec.source, spec.hf, skip_transformer=four_bit, revision=spec.revision)
        import diffusers
        import transformers

        # Progress bars only clutter replica logs; load time is logged (and exported) instead.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        dtype = DTYPES[target.torch_dtype]
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "local_files_only": True,
                                  **cls.extra_components(spec, folder)}
        sharded = False
        if four_bit:
            kwargs["transformer"] = cls._nunchaku_transformer(spec, target)
        # The files read front to back while from_pretrained maps them and prepare() moves them to the device:
        # bench/load.py measured this the fastest way off the disk (docs/benchmarks.md, "Cold start").
        with prefetch(weight_files(folder, skip=("transformer",) if four_bit else ())):
            try:
                if spec.variant.precision == "fp8":
                    kwargs["transformer"] = cls._fp8_transformer(folder, dtype, target)
                elif spec.parallel is not None and ParallelMode.parse(spec.parallel).kind == "tp":
                    kwargs["transformer"] = cls._tensor_parallel_transformer(folder, dtype, spec)
                    sharded = True
                pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(folder, **kwargs)
            except ModelLoadError:
                raise
            except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
                raise ModelLoadError(f"{spec.variant.id}: loading {folder} failed: {type(err).__name__}: "
                                     f"{err}") from err
            return cls.prepare(pipe, spec, target, started, str(folder), nunchaku_transformer=four_bit,
                               transformer_sharded=sharded)

    @classmethod
    def _fp8_transformer(cls, folder: Path, dtype: torch.dtype, target: LoadTarget):
        """The checkpoint's bf16 transformer, quantized to fp8 layer by layer as it loads (``fp8_placement``)."""
        import diffusers

        index = json.loads((folder / "model_index.json").read_text())
        transformer_class = getattr(diffusers, index["transformer"][1])
        config = diffusers.TorchAoConfig(fp8_quantization(target.device, target.gpu))
        return transformer_class.from_pretrained(folder, subfolder="transformer", dtype=dtype, use_safetensors=True,
                                                 local_files_only=True, quantization_config=config,
                                                 **fp8_placement(target.device))

    @classmethod
    def _tensor_parallel_transformer(cls, folder: Path, dtype: torch.dtype, spec: EngineSpec):
        """This rank's share of the transformer, sharded by diffusers while it reads the checkpoint (the process
        group is joined already: ``deployments.parallel_replica``)."""
        import diffusers

        index = json.loads((folder / "model_index.json").read_text())
        transformer_class = getattr(diffusers, index["transformer"][1])
        return transformer_class.from_pretrained(
            folder, subfolder="transformer", dtype=dtype, use_safetensors=True, local_files_only=True,
            parallel_config=tensor_parallel_config(ParallelMode.parse(spec.parallel)))

    @classmethod
    def context_parallel_plan(cls, transformer) -> dict[str, Any] | None:
        """How the transformer's inputs split over ranks and its output gathers (diffusers' ``ContextParallelInput``
        / ``ContextParallelOutput``); None: the model's own ``_cp_plan``."""
        return None

    @classmethod
    def extra_components(cls, spec: EngineSpec, folder: Path) -> dict[str, Any]:
        """Components the family builds itself instead of letting ``from_pretrained`` load them."""
        return {}

    @classmethod
    def _nunchaku_transformer(cls, spec: EngineSpec, target: LoadTarget):
        from serve_app.engines.nunchaku_support import fit_to_diffusers, transformer_class

        transformer = transformer_class(cls.nunchaku_transformer_class)
        weights = spec.variant.source
        source = weight_file(spec.transformer_source, weights.transformer_repo, weights.transformer_file,
                             spec.transformer_revision, spec.hf, "nunchaku transformer")
        loaded = transformer.from_pretrained(str(source), torch_dtype=DTYPES[target.torch_dtype])
        if target.torch_dtype == "float16" and hasattr(loaded, "set_attention_impl"):
            # nunchaku's own fp16 attention, which Turing needs (its flash-attention path is Ampere+).
            loaded.set_attention_impl("nunchaku-fp16")
        adapters = fit_to_diffusers(loaded, cls.pipeline_class, cls.transformer_call_keywords)
        if adapters:
            logger.info("%s: nunchaku adapted to this diffusers with %s", spec.variant.id, ", ".join(adapters))
        return loaded

    @classmethod
    def prepare(cls, pipe, spec: EngineSpec, target: LoadTarget, started: float, source: str,
                nunchaku_transformer: bool = False, transformer_sharded: bool = False) -> DiffusersEngine:
        """Finish a built pipeline: scheduler overrides, parallelism, offload mode, speed options; wrap it as an
        engine. ``transformer_sharded``: loaded as this rank's tensor-parallel share already (a pipeline built in
        memory is sharded here instead)."""
        variant = spec.variant
        if (largest := cls.largest_side(pipe)) is not None and largest < variant.max_side:
            raise ModelLoadError(
                f"{variant.id}: {source} takes images up to {largest} px a side (its transformer's position "
                f"tables), but the catalog serves up to max_side {variant.max_side}: lower max_side or use a "
                "checkpoint with longer tables")
        if variant.precision == "fp8" and not holds_fp8_weights(pipe.transformer):
            # A pipeline built in memory (random weights) rather than loaded: quantize the whole transformer now.
            recipe = fp8_quantization(target.device, target.gpu)
            from torchao.quantization import quantize_

            quantize_(pipe.transformer, recipe)
        if variant.scheduler_overrides:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **variant.scheduler_overrides)
        lora = None
        if variant.source.lora_file is not None:
            lora = weight_file(spec.lora_source, variant.source.lora_repo, variant.source.lora_file,
                               spec.lora_revision, spec.hf, "LoRA")
        # A resident pipeline fuses on its device (a GPU merges 20B weights in seconds); an offloaded one fuses
        # on the host, before the offload hooks own the weights.
        fuse_on_device = target.offload_mode == "none"
        if lora is not None and not fuse_on_device:
            fuse_lora(pipe, lora, variant.source.lora_scale)
        if spec.parallel is not None and (mode := ParallelMode.parse(spec.parallel)).kind == "cp":
            context_parallel(pipe.transformer, mode, cls.context_parallel_plan(pipe.transformer))
        elif spec.parallel is not None and not transformer_sharded:
            tensor_parallel(pipe.transformer, mode)
        apply_offload(pipe, target.offload_mode, target.device, nunchaku_transformer)
        if lora is not None and fuse_on_device:
            fuse_lora(pipe, lora, variant.source.lora_scale)
        adapters = None
        if spec.loras:
            adapters = LoraAdapters(pipe, {lora.name: lora_file(lora, spec.hf) for lora in spec.loras},
                                    spec.max_loaded_loras)
        applied = apply_optimizations(pipe, spec.optimizations)
        pipe.set_progress_bar_config(disable=True)
        load_seconds = time.perf_counter() - started
        logger.info("loaded %s from %s on %s (%s, offload=%s%s) in %.2fs", variant.id, source, target.device,
                    target.torch_dtype, target.offload_mode, "".join(f", {a}" for a in applied), load_seconds)
        info = EngineInfo(device=target.device, torch_dtype=target.torch_dtype, offload_mode=target.offload_mode,
                          load_seconds=load_seconds, planned_peak_gib=target.planned_peak_gib, source=source)
        engine = cls(spec, pipe, info)
        engine.adapters = adapters
        return engine

    @classmethod
    def largest_side(cls, pipe) -> int | None:
        """The largest image side the loaded checkpoint can take, from its own config (None: no bound)."""
        return None

    # ---- running --------------------------------------------------------------------------

    def warm_up_size(self) -> tuple[int, int]:
        """(width, height) of the warm-up call: tiny, unless the transformer is compiled. torch.compile
        specializes on shapes, so only a warm-up at the configured default size spares the first real
        request the compile."""
        if self.spec.optimizations.compile_transformer:
            defaults = self.variant.defaults
            return self.spec.plan_width or defaults.width, self.spec.plan_height or defaults.height
        side = max(self.variant.min_side, 64)
        return side, side

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in the pipeline's own tokenizer (what ``usage.input_tokens`` reports)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        return len(tokenizer(prompt)["input_ids"]) if tokenizer is not None else 0

    @staticmethod
    def seeds(seed: int | None, n: int) -> list[int]:
        """Seeds of ``n`` images: ``seed + i`` (random ``seed`` when None), wrapped past ``MAX_SEED``."""
        base = secrets.randbelow(MAX_SEED - n) if seed is None else seed
        return [(base + i) % (MAX_SEED + 1) for i in range(n)]

    # ---- previews while streaming ------------------------------------------------------------

    def step_hook(self, job: Job | None, width: int, height: int) -> Callable[[int, Any], None] | None:
        """What the pipeline call runs after each step for ``job``'s previews (None when it streams none)."""
        if job is None or job.on_preview is None or not job.preview_steps:
            return None
        return LatentPreviewer(self, job.preview_steps, job.on_preview, width, height)

    def latent_grid(self, latents, width: int, height: int):
        """The pipeline's latents as a (batch, channels, height/8, width/8) grid (families that pack override)."""
        return latents

    def encode_for_preview(self, pixels):
        """(B, 3, H, W) pixels in [-1, 1] -> latents normalized as the denoising loop holds them, on a grid."""
        raise NotImplementedError

    def latent_rgb(self):
        """The least-squares linear map from a latent vector (plus 1) to the mean RGB of its 8x8 pixels,
        fitted once on this pipeline's own VAE from smooth synthetic images (no per-preview VAE decode)."""
        if getattr(self, "_latent_rgb", None) is None:
            self._latent_rgb = fit_latent_rgb(self)
        return self._latent_rgb

    def _after_broken_call(self) -> None:
        """What a pipeline does at the end of a completed ``__call__``, for one that did not complete: diffusers
        resets the step-cache hooks' state (and re-arms model offload) only in ``maybe_free_model_hooks``, the last
        line of ``__call__`` (pipeline_utils.py). A call cancelled at the VAE decode, or failed anywhere, skips
        it, and the next request would start from the broken call's cached residuals: of another size, a shape
        error on every later request; of the same size, a different image."""
        self.pipe.maybe_free_model_hooks()

    def use_lora(self, lora: LoraRequest | None) -> None:
        """Activate ``lora`` for the next pipeline call (none: the plain transformer); its load, when it was not
        loaded, is timed as ``lora_load_s``."""
        if self.adapters is None:
            if lora is not None:
                raise UnsupportedValueError(f"{self.variant.id} takes no per-request LoRA (none is configured "
                                            "for it)", param="lora")
            return
        started = time.perf_counter()
        if self.adapters.use(lora) in ("load", "hotswap"):
            self._timer.seconds["lora_load_s"] = time.perf_counter() - started

    def one_call_per_image(self, seeds: list[int], num_inference_steps: int,
                           should_stop: Callable[[], bool] | None, on_step: Callable[[int, Any], None] | None,
                           lora: LoraRequest | None, call_pipeline: Callable[[torch.Generator, Callable], list]
                           ) -> EngineResult:
        """One image per pipeline call, one call per seed (the pipelines that take one image set a call):
        ``call_pipeline(generator, on_step_end)`` runs the pipeline once and returns its images. The timings
        add up the calls."""
        outputs: list = []
        timings: StageTimings = {}
        done = 0
        for seed in seeds:
            with self.pipeline_call(num_inference_steps, should_stop, on_step, lora) as call:
                outputs.extend(call_pipeline(torch.Generator("cpu").manual_seed(seed), call.on_step_end))
            done = call.steps_done
            for stage, seconds in call.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return EngineResult(outputs, seeds, timings, done, batch_images=1, denoised_images=len(outputs))

    @contextmanager
    def pipeline_call(self, num_inference_steps: int,
                      should_stop: Callable[[], bool] | None,
                      on_step: Callable[[int, Any], None] | None = None,
                      lora: LoraRequest | None = None) -> Iterator[PipelineCall]:
        """Serialize, time and make cancellable the ``self.pipe(...)`` call made inside this block, with the
        transformer's per-request ``lora`` active (none: no adapter).

        On leaving it, ``call.timings`` holds the stage seconds plus ``denoise_s`` (the rest) and
        ``total_s``; if ``should_stop`` stopped the denoising, ``GenerationCancelled`` is raised. A call that
        does not complete (cancelled, or failed anywhere) leaves no state behind for the next (``_after_broken_call``).
        """
        call = PipelineCall(num_inference_steps, should_stop, on_step)
        with self._lock:
            self._timer.seconds = {}
            started = time.perf_counter()
            self._call = call
            completed = False
            try:
                self.use_lora(lora)
                with torch.inference_mode():
                    yield call
                completed = not call.stopped
            except (RuntimeError, MemoryError) as err:
                if (typed := engine_failure(err)) is err:
                    raise
                raise typed from err
            finally:
                self._call = None
                if not completed:
                    self._after_broken_call()
            total = time.perf_counter() - started
            call.timings = dict(self._timer.seconds)
        if call.stopped:
            raise call.cancelled()
        call.timings["denoise_s"] = max(total - sum(call.timings.values()), 0.0)
        call.timings["total_s"] = total
