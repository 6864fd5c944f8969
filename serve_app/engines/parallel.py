"""One pipeline over several processes, one per GPU: joining the ranks' process group, and diffusers' own
parallelism on each rank's transformer (``serve_app.domain.parallelism`` prices the modes).

Every rank loads the whole pipeline (under tensor parallel, only its share of the transformer) and runs every
call with the same inputs and seeds; the transformer's collectives keep the ranks in step, and each ends with
the whole image. ``deployments.parallel_replica`` starts the ranks and lets one answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from serve_app.domain.parallelism import ParallelMode


@dataclass(frozen=True)
class RankGroup:
    """How one rank finds the others: its rank, their number, the TCP address rank 0 listens on, and how long a
    collective may wait for a silent peer before it raises."""

    rank: int
    world_size: int
    init_method: str
    timeout_s: float

    def join(self) -> None:
        """Join the group (NCCL on CUDA, gloo on CPU); returns once every rank has."""
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray gives each rank's actor its own GPU, visible as device 0
        dist.init_process_group(backend, init_method=self.init_method, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=self.timeout_s))


def joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave() -> None:
    import torch.distributed as dist

    if joined():
        dist.destroy_process_group()


@contextlib.contextmanager
def _cpu_counts_as_one_device() -> Iterator[None]:
    """diffusers 0.42.1 names each rank's device ``rank % torch.accelerator.device_count()``
    (``ModelMixin._resolve_parallel_config``), which divides by zero where torch sees no accelerator. On CPU every
    rank's device is the CPU: count it as one device while diffusers resolves the mesh."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def context_parallel(transformer, mode: ParallelMode, plan: dict[str, Any] | None) -> None:
    """Split ``transformer``'s sequence over the group's ranks (Ulysses, ``mode.degree`` ways), with ``plan`` or the
    model's own ``_cp_plan``. ``ulysses_anything``: prompts and images of any length, not only multiples of the
    degree (a strict split asserts on a prompt of odd length)."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=mode.degree, ulysses_anything=True)
    with _cpu_counts_as_one_device():
        transformer.enable_parallelism(config=config, cp_plan=plan)


def tensor_parallel_config(mode: ParallelMode):
    """What ``from_pretrained(parallel_config=...)`` takes to load only this rank's share of the transformer.
    diffusers refuses CPU devices for it (``hooks/tensor_parallel.py``, ``_SUPPORTED_TP_DEVICES``)."""
    from diffusers import TensorParallelConfig

    return TensorParallelConfig(tp_degree=mode.degree)


def tensor_parallel(transformer, mode: ParallelMode) -> None:
    """Shard a transformer built in memory (random weights) over the group's ranks, as ``from_pretrained`` with
    ``tensor_parallel_config`` does while it reads a checkpoint."""
    with _cpu_counts_as_one_device():
        transformer.enable_parallelism(config=tensor_parallel_config(mode))
