"""What every diffusers engine shares: loading, per-image seeds, stage timing and cancellation.

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
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from serve_app.domain.catalog import GPUClass, ModelVariant
from serve_app.domain.config import HFConfig, OptimizationConfig, StepCacheConfig
from serve_app.domain.errors import UnsupportedValueError
from serve_app.domain.planner import OffloadMode, architecture_problem, plan
from serve_app.domain.schemas import MAX_SEED, LoraRequest
from serve_app.domain.specs import EngineSpec
from serve_app.engines.host_copies import HostCopies
from serve_app.engines.previews import LatentPreviewer, fit_latent_rgb
from serve_app.engines.protocol import EngineInfo, GenerationCancelled, IncompatibleHardwareError, Job, ModelLoadError
from serve_app.engines.weights_io import prefetch, weight_files

if TYPE_CHECKING:
    from serve_app.engines.loras import LoraAdapters

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise IncompatibleHardwareError("device 'cuda' was asked for, but torch sees no CUDA device")
    return requested


def pipeline_folders(model_index: dict[str, Any], with_transformer: bool = True) -> set[str]:
    """The component folders a diffusers ``model_index.json`` lists (entries ``[library, class]``), without
    ``transformer`` when a nunchaku 4-bit transformer replaces it."""
    folders = {name for name, value in model_index.items()
               if isinstance(value, list) and len(value) == 2 and value[0] is not None}
    return folders if with_transformer else folders - {"transformer"}


def resolve_source(source: str, hf: HFConfig, skip_transformer: bool = False, revision: str | None = None) -> Path:
    """A local pipeline folder for ``source`` (a folder, or a hub repo id from the local cache, at the commit
    ``revision`` when pinned).

    ``skip_transformer`` leaves out the bf16 transformer (41 GB for Qwen-Image-Edit) when a
    nunchaku 4-bit transformer replaces it.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if not HUB_REPO_ID.fullmatch(source):
        raise ModelLoadError(f"model folder {source} does not exist")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        # Only what the pipeline loads (what `imageserve download` fetches): huggingface_hub refuses an
        # offline snapshot that lacks any file of the patterns asked for, READMEs and sample images included.
        index = hf_hub_download(source, "model_index.json", revision=revision, cache_dir=hf.cache_dir,
                                local_files_only=hf.offline)
        folders = pipeline_folders(json.loads(Path(index).read_text()), with_transformer=not skip_transformer)
        return Path(snapshot_download(
            source, revision=revision, cache_dir=hf.cache_dir, local_files_only=hf.offline,
            allow_patterns=["model_index.json", *(f"{folder}/*" for folder in sorted(folders))],
        ))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        where = "in the local Hugging Face cache (offline mode)" if hf.offline else "on the Hub"
        at = f"@{revision}" if revision else ""
        raise ModelLoadError(f"{source}{at} is not available {where}: {type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class LoadTarget:
    """Where and how a variant loads: device, the local GPU's class, offload mode, dtype."""

    device: str
    gpu: GPUClass | None
    offload_mode: OffloadMode
    planned_peak_gib: float | None
    torch_dtype: str

    @classmethod
    def for_spec(cls, spec: EngineSpec) -> LoadTarget:
        """Resolve ``spec`` on this machine; refuses, before any weight is read, what cannot run here."""
        variant = spec.variant
        device = resolve_device(spec.device)
        gpu = None
        if device == "cuda":
            from serve_app.engines.hardware import detect_local_gpu

            local = detect_local_gpu(spec.gpus)
            gpu = local.gpu_class if local else None
        elif variant.requires_nunchaku:
            raise IncompatibleHardwareError(f"{variant.id} is a nunchaku 4-bit variant and needs a CUDA GPU")
        if gpu is not None and (problem := architecture_problem(variant, gpu)):
            raise IncompatibleHardwareError(f"{variant.id} cannot run here: {problem}")
        mode, planned = "none", None
        if gpu is not None:
            verdict = plan(variant, gpu, spec.plan_width, spec.plan_height, modes=spec.offload_modes,
                           settings=spec.planner, batch_size=spec.batch_size)
            if not verdict.fits:
                raise IncompatibleHardwareError(f"{variant.id} does not fit {gpu.name}: {verdict.reason}")
            mode, planned = verdict.mode, verdict.peak_vram_gib
        return cls(device, gpu, mode, planned, compute_dtype(spec.torch_dtype, device, gpu))


def compute_dtype(requested: str | None, device: str, gpu: GPUClass | None) -> str:
    """The torch dtype to run in: the requested one, else bfloat16 on CUDA and float32 on CPU.

    GPUs before Ampere (sm_75, Turing) have no bfloat16: they run float16, as nunchaku's int4 kernels
    need there, and a request for bfloat16 on them is refused rather than emulated slowly.
    """
    has_bf16 = gpu is None or gpu.sm >= 80
    if requested == "bfloat16" and device == "cuda" and not has_bf16:
        raise IncompatibleHardwareError(f"{gpu.name} (sm_{gpu.sm}) has no bfloat16; use torch_dtype float16")
    if requested:
        return requested
    if device != "cuda":
        return "float32"
    return "bfloat16" if has_bf16 else "float16"


# Consumer and workstation Blackwell (sm_120 RTX 50-series and RTX PRO 6000, sm_121 GB10): cuBLAS has no row-wise
# fp8 scaling there, so torch._scaled_mm with per-row scales fails with CUBLAS_STATUS_NOT_SUPPORTED (pytorch
# issue 192707; pytorch PR 161236). One scale per tensor runs on every fp8 GPU.
PER_TENSOR_FP8_SM = frozenset({120, 121})


def fp8_quantization(device: str, gpu: GPUClass | None = None):
    """torchao's fp8 recipe for an fp8 variant's transformer on ``device`` (and the local ``gpu``'s class): on
    CUDA, fp8 weights and fp8 activations, so the linear layers run fp8 matmuls (sm_89 and newer; the planner
    refuses the rest), scaled per row, or per tensor where cuBLAS has no row-wise scaling
    (``PER_TENSOR_FP8_SM``); elsewhere fp8 weights widened per layer (weight-only), which torchao runs on CPU."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            PerTensor,
        )
    except ImportError:
        raise ModelLoadError("fp8 variants are quantized at load by torchao, which is not installed here: "
                             "pip install 'imageserve[fp8]'") from None
    if device == "cuda":
        per_tensor = gpu is not None and gpu.sm in PER_TENSOR_FP8_SM
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor() if per_tensor else PerRow())
    return Float8WeightOnlyConfig()


def fp8_placement(device: str) -> dict[str, Any]:
    """Where an fp8 transformer's bf16 weights go as they load, to be quantized there: the GPU that runs it.
    diffusers' torchao quantizer quantizes each weight on the device its ``device_map`` names; without one, the
    whole bf16 transformer (41 GB for Qwen-Image-Edit) is quantized on the host (torchao_quantizer.py,
    ``create_quantized_param``). The GPU holds the fp8 transformer in every offload mode fp8 variants take."""
    return {"device_map": device} if device == "cuda" else {}


def holds_fp8_weights(module: torch.nn.Module) -> bool:
    """Whether ``module``'s linear layers already hold torchao fp8 weights."""
    return any(type(m.weight).__name__.startswith("Float8") for m in module.modules()
               if isinstance(m, torch.nn.Linear))


def apply_offload(pipe, mode: OffloadMode, device: str, nunchaku_transformer: bool) -> None:
    if device == "cpu" or mode == "none":
        pipe.to(device)
        return
    if mode == "model":
        pipe.enable_model_cpu_offload()
        return
    if nunchaku_transformer:
        if not hasattr(pipe.transformer, "set_offload"):
            # nunchaku's Z-Image transformer has none in any release (its from_pretrained refuses offload=True).
            raise ModelLoadError(f"{type(pipe.transformer).__name__} has no per-block offload (set_offload): set "
                                 "per_block_offload: false for this variant in the catalog")
        # nunchaku streams its own blocks; accelerate handles the text encoder and VAE.
        pipe.transformer.set_offload(True, use_pin_memory=False, num_blocks_on_gpu=1)
        # A new list on this pipeline: appending would change the class attribute every pipeline shares.
        pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "transformer"]
    pipe.enable_sequential_cpu_offload()


def set_channels_last(module: torch.nn.Module, enabled: bool = True) -> None:
    """Put every convolution's weights of ``module`` in channels-last format (or back).

    Per convolution, because the Qwen-Image VAE mixes Conv3d (5-D, channels_last_3d) and 2-D layers.
    """
    for conv in module.modules():
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)):
            if not enabled:
                fmt = torch.contiguous_format
            else:
                fmt = torch.channels_last_3d if isinstance(conv, torch.nn.Conv3d) else torch.channels_last
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Run every attention of ``transformer`` (and only those) on ``backend``.

    diffusers 0.42.1's ``ModelMixin.set_attention_backend`` sets the backend on each attention processor of the
    model and then also makes it the process-wide default (``_AttentionBackendRegistry.set_active_backend``),
    which every other model in the process, whose processors name no backend, then runs on: another member of a
    swap group, say, where a maskless backend breaks Z-Image's masked calls. The default is put back. A
    transformer whose attention modules are not diffusers' (nunchaku's) takes no backend: refused rather than
    logged as applied.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(backend)
    except (AttributeError, ImportError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"attention_backend {backend!r} is not usable here: {err}") from None
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    taken = [m for m in transformer.modules()
             if getattr(getattr(m, "processor", None), "_attention_backend", None) is not None]
    if not taken:
        raise ModelLoadError(f"attention_backend {backend!r}: no attention module of {type(transformer).__name__} "
                             "takes a diffusers attention backend")


def apply_optimizations(pipe, options: OptimizationConfig) -> list[str]:
    """Apply the configured speed options to a loaded pipeline; returns what was applied.

    bench/gpu_fullsize.py measures each option against the default on a GPU.
    """
    applied = []
    if options.attention_backend is not None:
        set_attention_backend(pipe.transformer, options.attention_backend)
        applied.append(f"attention_backend={options.attention_backend}")
    if options.vae_channels_last:
        set_channels_last(pipe.vae)
        applied.append("vae_channels_last")
    if options.step_cache is not None:
        pipe.transformer.enable_cache(step_cache_config(options.step_cache))
        applied.append(f"step_cache={options.step_cache.kind}")
    if options.compile_transformer:
        pipe.transformer.compile(mode=options.compile_mode)
        applied.append(f"compile_transformer={options.compile_mode}")
    return applied


def step_cache_config(cache: StepCacheConfig):
    """diffusers' cache config for ``cache``."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    return TaylorSeerCacheConfig(cache_interval=cache.cache_interval,
                                 disable_cache_before_step=cache.disable_cache_before_step)


class _StageTimer:
    """Times the pipeline's text encoding, VAE encode and VAE decode by wrapping those calls.

    On CUDA the host returns from a kernel launch long before the GPU is done, so ``synchronize``
    (``torch.cuda.synchronize``) runs before and after each stage; without it the VAE's time lands
    in the next stage or in ``denoise_s``. On CPU there is nothing to wait for and it is None.
    """

    def __init__(self, pipe, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.synchronize = synchronize
        self._wrap(pipe, "encode_prompt", "text_encode_s")
        self._wrap(pipe.vae, "encode", "vae_encode_s")
        self._wrap(pipe.vae, "decode", "vae_decode_s")

    def _wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.synchronize is not None:
                self.synchronize()
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if self.synchronize is not None:
                    self.synchronize()
                return result
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


@dataclass
class PipelineCall:
    """One call of a pipeline in progress: pass ``on_step_end`` as its ``callback_on_step_end``."""

    num_inference_steps: int
    should_stop: Callable[[], bool] | None
    on_step: Callable[[int, Any], None] | None = None  # (step, latents after it), e.g. ``LatentPreviewer``
    steps_done: int = 0
    stopped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = step + 1
        if self.on_step is not None:
            self.on_step(step, callback_kwargs["latents"])
        if self.should_stop is not None and self.should_stop():
            self.stopped = True
            pipe._interrupt = True  # diffusers checks it before the next step
        return callback_kwargs

    def cancelled(self) -> GenerationCancelled:
        return GenerationCancelled(f"stopped after {self.steps_done} of {self.num_inference_steps} steps")


def weight_file(local: str | None, repo: str | None, file: str | None, revision: str | None, hf: HFConfig,
                what: str) -> Path:
    """One weight file: ``local`` (a file, or a folder holding ``file``), else ``file`` of the hub ``repo`` at
    ``revision`` from the Hugging Face cache (or the Hub when not offline)."""
    if local is None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo, file, revision=revision, cache_dir=hf.cache_dir,
                                        local_files_only=hf.offline))
        except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
            raise ModelLoadError(f"{what} {repo}/{file} is not available: {err}") from None
    path = Path(local).expanduser()
    if path.is_dir():
        path = path / Path(file).name
    if not path.exists():
        raise ModelLoadError(f"{what} file {path} does not exist")
    return path


def fuse_lora(pipe, path: Path, scale: float) -> None:
    """Fuse the LoRA file ``path`` into the pipeline's transformer and drop the LoRA layers: the transformer is
    then a plain one with merged weights, as fast as the base model (diffusers' PEFT integration)."""
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="fused")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
        pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelLoadError(f"fusing the LoRA {path} failed: {type(err).__name__}: {err}") from err


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
        self._timer = _StageTimer(pipe, torch.cuda.synchronize if info.device == "cuda" else None)
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
        if four_bit:
            kwargs["transformer"] = cls._nunchaku_transformer(spec, target)
        # The files read front to back while from_pretrained maps them and prepare() moves them to the device:
        # bench/load.py measured this the fastest way off the disk (docs/benchmarks.md, "Cold start").
        with prefetch(weight_files(folder, skip=("transformer",) if four_bit else ())):
            try:
                if spec.variant.precision == "fp8":
                    kwargs["transformer"] = cls._fp8_transformer(folder, dtype, target)
                pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(folder, **kwargs)
            except ModelLoadError:
                raise
            except (OSError, ValueError, RuntimeError, KeyError, ImportError) as err:
                raise ModelLoadError(f"{spec.variant.id}: loading {folder} failed: {type(err).__name__}: "
                                     f"{err}") from err
            return cls.prepare(pipe, spec, target, started, str(folder), nunchaku_transformer=four_bit)

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
                nunchaku_transformer: bool = False) -> DiffusersEngine:
        """Finish a built pipeline: scheduler overrides, offload mode, speed options; wrap it as an engine."""
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
        apply_offload(pipe, target.offload_mode, target.device, nunchaku_transformer)
        if lora is not None and fuse_on_device:
            fuse_lora(pipe, lora, variant.source.lora_scale)
        adapters = None
        if spec.loras:
            from serve_app.engines.loras import LoraAdapters, lora_file

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
