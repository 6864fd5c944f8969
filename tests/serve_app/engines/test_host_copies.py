"""Parking weights in host RAM and restoring them: identity kept, values kept, tied weights moved once.

There is no GPU here, so the copies go from CPU to CPU: the bookkeeping is what these tests check, the
copy over PCIe is bench/gpu_fullsize.py's to measure."""

from __future__ import annotations

import torch

from serve_app.engines.base import HostCopies


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
    slots = {(type(owner).__name__, name) for owner, name, _ in copies._slots}
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
