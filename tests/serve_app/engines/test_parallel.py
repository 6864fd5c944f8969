"""What the multi-GPU path rests on in diffusers 0.42.1, checked in one process (a one-rank gloo group).

Two ranks run in tests/multi_gpu/ (Ray actors, the serving path) and in bench.parallel (spawned processes)."""

from __future__ import annotations

import pytest
import torch

from serve_app.domain.parallelism import ParallelMode
from serve_app.engines.parallel import RankGroup, joined, leave, tensor_parallel
from serve_app.runner import free_port


@pytest.fixture
def one_rank_group():
    RankGroup(0, 1, f"tcp://127.0.0.1:{free_port()}", timeout_s=60).join()
    try:
        yield
    finally:
        leave()
    assert not joined()


def tiny_qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4))


def test_diffusers_refuses_tensor_parallel_on_cpu(one_rank_group):
    """The fact behind the config's refusal of tp on a CPU device: diffusers' own check, in its own words."""
    with pytest.raises(ValueError, match="Tensor parallelism is not supported on device type 'cpu'"):
        tensor_parallel(tiny_qwen_transformer(), ParallelMode("tp", 1))


def test_cpu_counts_as_one_device_only_while_diffusers_resolves_the_mesh(one_rank_group):
    """diffusers divides the rank by the accelerator count, 0 on a CPU-only torch; the engine lets it count one,
    and only for that call, even one that fails (here: two ranks asked of a group of one)."""
    from serve_app.engines.parallel import context_parallel

    before = torch.accelerator.device_count()
    with pytest.raises(RuntimeError, match="bigger than default world size 1"):
        context_parallel(tiny_qwen_transformer(), ParallelMode("cp", 2), None)
    assert torch.accelerator.device_count() == before


def test_the_configs_context_parallel_backends_are_the_ones_diffusers_runs_it_with():
    """The config refuses cp with a backend outside CONTEXT_PARALLEL_BACKENDS; diffusers' registry says the
    same of every backend a config may name."""
    import typing

    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from serve_app.domain.config import AttentionBackend
    from serve_app.domain.config_rules import CONTEXT_PARALLEL_BACKENDS

    for name in typing.get_args(AttentionBackend):
        supported = _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))
        assert supported == (name in CONTEXT_PARALLEL_BACKENDS), name
