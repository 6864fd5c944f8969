"""Where a variant's weights come from and how they are placed: the device, the weights' folder or file (a
local path or the offline Hugging Face cache), the compute dtype, fp8 quantization and the offload mode.
``DiffusersEngine.load`` (base.py) calls these in that order."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serve_app.domain.catalog import GPUClass
from serve_app.domain.config import HFConfig
from serve_app.domain.parallelism import ParallelMode, plan_parallel_mode
from serve_app.domain.planner import OffloadMode, architecture_problem, plan
from serve_app.domain.specs import EngineSpec
from serve_app.engines.hardware import compute_dtype, detect_local_gpu
from serve_app.engines.protocol import IncompatibleHardwareError, ModelLoadError

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
            local = detect_local_gpu(spec.gpus)
            gpu = local.gpu_class if local else None
        elif variant.requires_nunchaku:
            raise IncompatibleHardwareError(f"{variant.id} is a nunchaku 4-bit variant and needs a CUDA GPU")
        if gpu is not None and (problem := architecture_problem(variant, gpu)):
            raise IncompatibleHardwareError(f"{variant.id} cannot run here: {problem}")
        mode, planned = "none", None
        if gpu is not None and spec.parallel is not None:  # each rank holds its share: the parallel planner's
            verdict = plan_parallel_mode(variant, gpu, ParallelMode.parse(spec.parallel), spec.plan_width,
                                         spec.plan_height, settings=spec.planner, batch_size=spec.batch_size,
                                         offload_modes=spec.offload_modes)
            if not verdict.fits:
                raise IncompatibleHardwareError(f"{variant.id} in {spec.parallel} does not fit {gpu.name}: "
                                                f"{verdict.reason}")
            mode, planned = verdict.offload_mode, verdict.peak_vram_gib
        elif gpu is not None:
            verdict = plan(variant, gpu, spec.plan_width, spec.plan_height, modes=spec.offload_modes,
                           settings=spec.planner, batch_size=spec.batch_size)
            if not verdict.fits:
                raise IncompatibleHardwareError(f"{variant.id} does not fit {gpu.name}: {verdict.reason}")
            mode, planned = verdict.mode, verdict.peak_vram_gib
        return cls(device, gpu, mode, planned, compute_dtype(spec.torch_dtype, device, gpu))


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
