"""What this machine has: the local GPU (as a catalog GPU class), host memory and disk."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from serve_app.domain.catalog import GIB, GPUClass, ModelVariant, match_gpu_name
from serve_app.engines.protocol import IncompatibleHardwareError


@dataclass(frozen=True)
class LocalGPU:
    device_name: str
    vram_gib: float
    compute_capability: str
    gpu_class: GPUClass
    in_catalog: bool


def detect_local_gpu(gpus: Iterable[GPUClass], index: int = 0) -> LocalGPU | None:
    """CUDA device ``index`` as a GPU class: the entry of ``gpus`` (the catalog's) whose name
    matches, else one made from the device's own properties (so an unlisted card still gets planned)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        return None
    props = torch.cuda.get_device_properties(index)
    cc = f"{props.major}.{props.minor}"
    vram = props.total_memory / GIB
    known = match_gpu_name(gpus, props.name)
    if known is not None and known.compute_capability == cc:
        # The card's real memory wins over the nominal figure (e.g. 79.6 GiB on an "80 GB" H100).
        gpu_class = known.model_copy(update={"vram_gib": round(min(vram, known.vram_gib), 2)})
        return LocalGPU(props.name, vram, cc, gpu_class, in_catalog=True)
    synthesized = GPUClass(
        id="local-" + props.name.lower().replace(" ", "-"),
        name=props.name,
        compute_capability=cc,
        architecture="unknown",
        vram_gib=round(vram, 2),
    )
    return LocalGPU(props.name, vram, cc, synthesized, in_catalog=False)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def hardware_refusal(variant: ModelVariant, device: str, has_cuda: bool) -> str | None:
    """Why ``variant`` cannot load on this machine at all, with the config's ``device`` ('auto', 'cuda', 'cpu'):
    the rules a replica applies when it loads (``LoadTarget.for_spec``), for the checks made before there is a
    replica (doctor, `imageserve run`). None when it can load, planning aside."""
    if device == "cuda" and not has_cuda:
        return "the config says device: cuda, and torch sees no CUDA GPU here"
    if variant.requires_nunchaku and (device == "cpu" or not has_cuda):
        return f"{variant.id} is a nunchaku 4-bit variant and needs a CUDA GPU"
    return None


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


def cpu_weights_gib(variant: ModelVariant, torch_dtype: str | None) -> float:
    """GiB of host RAM ``variant``'s weights take on CPU, in the dtype it runs in there (``torch_dtype``, else
    float32: ``compute_dtype``'s rule)."""
    from serve_app.domain.planner import DTYPE_SHORT

    return variant.weight_bytes(DTYPE_SHORT[compute_dtype(torch_dtype, "cpu", None)]) / GIB


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def free_disk_gb(path: str) -> float:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe or "/").free / 1e9
