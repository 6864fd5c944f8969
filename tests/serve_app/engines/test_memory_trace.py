"""Tracing activations on the meta device: the tracker, the attention stand-in, and the committed table."""

import torch

from serve_app.engines.memory_trace import AllocationTracker, fused_attention, trace_stage


def test_the_tracker_agrees_with_pytorchs_mem_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))

    def run():
        return module(torch.empty(64, 256, device="meta"))

    reference = MemTracker()
    reference.track_external(module)
    with reference, torch.inference_mode():
        run()
    peak = {getattr(k, "value", k): v for k, v in reference.get_tracker_snapshot("peak")[torch.device("meta")].items()}
    expected = peak["Total"] - peak["Parameter"] - peak["Buffer"]

    params, activations, _ = trace_stage(module, run)
    assert params * 1024**3 == sum(p.numel() * 4 for p in module.parameters())
    assert activations * 1024**3 == expected  # input, hidden, GELU output; the output of the second layer


def test_a_freed_intermediate_leaves_the_count():
    tracker = AllocationTracker()
    with tracker:
        a = torch.empty(1024, device="meta")  # 4 KiB
        b = a * 2
        del a, b
        c = torch.empty(256, device="meta")
    assert tracker.peak == 8192 and tracker.current == 1024
    del c


def test_attention_is_traced_as_a_fused_kernel_allocates_it():
    """Flash / memory-efficient attention keep no L x L score matrix; meta's math path, taken with autograd
    on, would (8 heads x 4096^2 here: 256 MiB and more)."""
    heads, length, dim = 8, 4096, 64
    q, k, v = (torch.empty(1, heads, length, dim, dtype=torch.bfloat16, device="meta") for _ in range(3))
    tracker = AllocationTracker()
    with fused_attention(), tracker:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    output_bytes = heads * length * dim * 2
    logsumexp_bytes = heads * length * 4
    assert out.shape == q.shape
    assert tracker.peak == output_bytes + logsumexp_bytes
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_the_committed_trace_matches_a_fresh_one():
    """Builds the full-size modules on the meta device and traces the smallest shapes (~20 s): the table in
    calibration.yaml is stale when diffusers, transformers or torch change what a stage allocates."""
    from serve_app.calibrate import committed_traced_table, stale_points, traced_table

    fresh = traced_table(quick=True)
    traced = {(p.module, p.stage) for p in fresh.points}
    assert {("z-image-transformer", "transformer"), ("qwen-image-transformer", "transformer")} <= traced
    assert stale_points(fresh, committed_traced_table()) == [], "run `imageserve calibrate --trace`"
