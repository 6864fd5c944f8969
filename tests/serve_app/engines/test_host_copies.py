"""Parking weights in host RAM and restoring them: identity kept, values kept, tied weights moved once, torchao's
fp8 subclasses moved by their inner tensors, one flat buffer per module, pinned at its exact size.

There is no GPU here, so the copies go from CPU to CPU: the bookkeeping is what these tests check, the
copy over PCIe is bench/gpu_fullsize.py's to measure."""

from __future__ import annotations

import pytest
import torch

from serve_app.engines.host_copies import ALIGNMENT, HostCopies, flat_bytes, per_tensor_pinned_bytes


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many text encoders
        self.norm = torch.nn.BatchNorm1d(4)  # buffers too


def test_park_then_restore_keeps_parameter_identity_and_values():
    torch.manual_seed(0)
    model = Tied()
    parameters = {name: p for name, p in model.named_parameters()}
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    copies = HostCopies([model], pin=True)
    copies.park()
    copies.restore("cpu")
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p for name, p in model.named_parameters()} == parameters  # the same Parameter objects
    assert model.head.weight is model.embed.weight


def test_tied_weights_and_buffers_are_each_moved_once():
    model = Tied()
    copies = HostCopies([model], pin=False)
    copies.park()
    slots = {(type(slot.owner).__name__, slot.name) for slot in copies._slots}
    assert ("Embedding", "weight") in slots and ("Linear", "weight") not in slots
    assert {("BatchNorm1d", "running_mean"), ("BatchNorm1d", "running_var")} <= slots


def test_parking_a_cpu_model_moves_no_bytes_and_restoring_before_a_park_is_nothing():
    model = Tied()
    copies = HostCopies([model], pin=False)
    assert copies.restore("cpu") == 0
    assert copies.park() == 0  # nothing was on a device
    assert copies.restore("cpu") == 0


def test_the_model_still_computes_the_same_after_a_round_trip():
    torch.manual_seed(1)
    model = Tied().eval()
    tokens = torch.tensor([[1, 2, 3]])
    expected = model.head(model.embed(tokens))
    copies = HostCopies([model], pin=False)
    for _ in range(3):
        copies.park()
        copies.restore("cpu")
    assert torch.equal(model.head(model.embed(tokens)), expected)


def _inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = tensor.untyped_storage().data_ptr()
    return buffer.data_ptr() <= start < buffer.data_ptr() + buffer.numel()


def fp8_model() -> torch.nn.Module:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    quantize_(model, Float8WeightOnlyConfig())  # what an fp8 variant's transformer holds (CPU recipe)
    return model


def test_an_fp8_weight_parks_its_inner_tensors_not_just_its_wrapper():
    """torchao's Float8Tensor keeps its data in ``qdata`` and ``scale``: assigning ``.data`` would leave both where
    they were (on the GPU), so parking would free nothing."""
    pytest.importorskip("torchao")
    model = fp8_model()
    weight = model[0].weight
    before = {name: getattr(weight, name) for name in ("qdata", "scale")}
    copies = HostCopies([model], pin=False)
    copies.park()
    (buffer,) = copies._buffers
    assert model[0].weight is weight  # the same parameter object
    assert type(weight).__name__ == "Float8Tensor"
    for name, old in before.items():
        moved = getattr(weight, name)
        assert moved is not old and _inside(moved, buffer), name
        assert torch.equal(moved.view(torch.uint8), old.view(torch.uint8))


def test_an_fp8_model_computes_the_same_after_park_and_restore():
    pytest.importorskip("torchao")
    model = fp8_model()
    x = torch.randn(3, 64)
    expected = model(x)
    copies = HostCopies([model], pin=False)
    for _ in range(2):
        copies.park()
        assert torch.equal(model(x), expected)
        copies.restore("cpu")
        assert torch.equal(model(x), expected)
    # Restored copies are new tensors, as a GPU copy would be, not views of the host buffer.
    assert not _inside(model[0].weight.qdata, copies._buffers[0])


def test_each_module_gets_one_buffer_of_its_weights_plus_alignment():
    models = [Tied(), torch.nn.Linear(7, 3)]
    copies = HostCopies(models, pin=False)
    assert copies.host_bytes == 0
    copies.park()
    assert len(copies._buffers) == 2
    weights = sum(t.numel() * t.element_size() for m in models for t in {id(t): t for t in
                                                                          [*m.parameters(), *m.buffers()]}.values())
    tensors = sum(len(slot.pieces) for slot in copies._slots)
    assert weights <= copies.host_bytes < weights + tensors * ALIGNMENT
    assert copies.host_bytes == flat_bytes(models)
    assert all(_inside(p.detach(), copies._buffers[0]) for p in models[0].parameters())


class RecordingCudart:
    """TEST DOUBLE for torch.cuda.cudart() (the CUDA runtime, which this machine has not): records what
    HostCopies page-locks and unlocks."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.registered[pointer] = size
        return 0  # cudaSuccess

    def cudaHostUnregister(self, pointer: int) -> int:
        self.unregistered.append(pointer)
        return 0


def test_pinning_registers_each_flat_buffer_at_its_exact_size_and_unregisters_it():
    cudart = RecordingCudart()
    copies = HostCopies([Tied(), torch.nn.Linear(300, 300)], pin=True, cudart=cudart)
    copies.park()
    assert cudart.registered == {b.data_ptr(): b.numel() for b in copies._buffers}
    assert copies.pinned_bytes == copies.host_bytes  # no power-of-two rounding
    pointers = set(cudart.registered)
    del copies
    assert set(cudart.unregistered) == pointers


def test_pinning_tensor_by_tensor_would_round_each_up_to_a_power_of_two():
    """What HostCopies avoids (the caching host allocator's rounding, ATen/core/CachingHostAllocator.h):
    bench/pinned_host.py computes it for the real transformers' tensors."""
    layer = torch.nn.Linear(3072, 3 * 3072, bias=False, device="meta")  # one Qwen-Image projection: 56.6 MB bf16
    weight = layer.weight.to(torch.bfloat16)
    assert per_tensor_pinned_bytes([weight]) == 64 * 2**20
    assert flat_bytes([layer.to(torch.bfloat16)]) == weight.numel() * 2
