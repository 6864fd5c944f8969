"""The planner's calibration: interpolation of traced points, the fit, and the committed files' freshness."""

import pytest

from serve_app.domain.calibration import (
    Measurements,
    TracedPoint,
    TracedTable,
    default_calibration,
    load_measurements,
    nonnegative_least_squares,
)
from serve_app.domain.fitting import fit_all


def table(*points):
    return TracedTable(torch="x", diffusers="x", transformers="x", attention="x",
                       points=[TracedPoint(module="m", stage="transformer", **p) for p in points])


def test_activations_interpolate_between_traced_sizes_and_extrapolate_past_them():
    t = table({"tokens": 1000, "activations_gib": 1.0}, {"tokens": 3000, "activations_gib": 2.0},
              {"tokens": 5000, "activations_gib": 4.0})
    assert t.activations("m", "transformer", 2000) == pytest.approx(1.5)
    assert t.activations("m", "transformer", 4000) == pytest.approx(3.0)
    assert t.activations("m", "transformer", 7000) == pytest.approx(6.0)  # the last segment's slope
    assert t.activations("m", "transformer", 0) == pytest.approx(0.5)
    assert t.activations("other", "transformer", 2000) is None
    assert t.activations("m", "vae_decode", 2000) is None


def test_batches_grow_linearly_through_the_two_traced_batch_sizes():
    t = table({"tokens": 1000, "batch": 1, "activations_gib": 1.0},
              {"tokens": 1000, "batch": 2, "activations_gib": 1.8})
    assert t.activations("m", "transformer", 1000, batch=2) == pytest.approx(1.8)
    assert t.activations("m", "transformer", 1000, batch=5) == pytest.approx(1.0 + 4 * 0.8)


def test_nonnegative_least_squares_finds_an_exact_solution_and_refuses_negative_terms():
    rows = [[1, 0], [0, 1], [1, 1]]
    assert nonnegative_least_squares(rows, [2, 3, 5]) == pytest.approx([2, 3])
    # The unconstrained answer is x = [-1, 2]; constrained, the first term is held at zero and the second
    # then best fits the only equation it is in.
    x = nonnegative_least_squares([[1, 0], [1, 1]], [-1, 1])
    assert x == pytest.approx([0, 1])


def test_the_committed_fit_is_what_the_committed_trace_and_measurements_give():
    """calibration.yaml's fitted terms are stale when measurements.yaml changed without a refit."""
    committed = default_calibration()
    refit = fit_all(committed.traced, load_measurements())
    assert refit.memory == committed.memory, "run `imageserve calibrate --fit`"
    assert refit.timing == committed.timing, "run `imageserve calibrate --fit`"


# The published figures the issue names, reproduced within +-10% unless the entry says why not.
WITHIN_TEN_PERCENT = {"z-image-resident-rtx5090", "z-image-model-offload-rtx5090", "qwen-vae-decode-rtx4090-reserved",
                      "qwen-vae-encode-rtx4090-reserved"}


def test_published_memory_figures_are_reproduced():
    residuals = {r.measurement: r for r in default_calibration().memory.residuals}
    for name in WITHIN_TEN_PERCENT:
        assert abs(residuals[name].error_fraction) <= 0.10, residuals[name]
    # Not within 10%, and why (docs/planner.md): the two published sequential-offload figures (1.86 and 2.37
    # GiB for one script) straddle the prediction; the trace sees less than the VAE decode allocates
    # (cuDNN's 3-D convolution workspaces go through the allocator and a meta trace cannot see them).
    assert residuals["z-image-sequential-offload-rtx5090"].measured_gib < residuals[
        "z-image-sequential-offload-rtx5090"].predicted_gib < residuals[
        "z-image-sequential-offload-rtx5090-readme"].measured_gib
    assert -0.20 < residuals["qwen-vae-decode-rtx4090-allocated"].error_fraction < 0


def test_published_step_and_end_to_end_times_are_reproduced_within_ten_percent():
    residuals = default_calibration().timing.residuals
    assert {r["measurement"] for r in residuals} >= {"sglang-z-image-h100", "sglang-z-image-rtx5090",
                                                     "diffusers-qwen-edit-2511-h100"}
    for r in residuals:
        assert abs(r["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"] <= 0.10, r
        if r["measured_s"] is not None:
            assert abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"] <= 0.10, r


def test_every_fitted_term_says_what_it_is():
    memory = default_calibration().memory
    for name in ("cuda_context_gib", "reserve_fraction", "resident_overhead_gib", "model_offload_overhead_gib"):
        term = getattr(memory, name)
        assert term.value >= 0 and "fitted" in term.description


def test_recorded_gpu_runs_are_read_with_the_published_measurements(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "memory:\n- {id: lent-h100, scope: pipeline, quantity: nvml, variant: z-image-turbo, mode: none,"
        " gpu: h100-sxm, gib: 23.5, source: bench}\ntiming: []\n")
    measurements = load_measurements(recorded=tmp_path)
    assert isinstance(measurements, Measurements)
    assert measurements.memory[-1].id == "lent-h100"
    assert len(measurements.memory) == len(load_measurements(recorded=tmp_path / "none").memory) + 1
