"""``imageserve calibrate``: regenerate the planner's calibration (traced activations and fitted terms)."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.domain.calibration import (
    CALIBRATION_PATH,
    Calibration,
    TracedPoint,
    TracedTable,
    load_measurements,
)
from serve_app.domain.fitting import fit_all

HEADER = """\
# The planner's calibration. GENERATED: do not edit by hand.
#   traced: `imageserve calibrate --trace` (each stage of each model traced at full size on the meta device,
#           serve_app/engines/memory_trace.py; about two minutes on a CPU)
#   memory, timing: `imageserve calibrate --fit` (fitted to serve_app/domain/measurements.yaml)
"""


def traced_table(quick: bool = False) -> TracedTable:
    """Trace every stage now (``quick``: the smallest shapes only)."""
    import diffusers
    import torch
    import transformers

    from serve_app.engines.memory_trace import round_gib, trace_all

    points = []
    for trace in trace_all(quick=quick):
        points.append(TracedPoint(module=trace.module, stage=trace.stage,
                                  activations_gib=round_gib(trace.activations_gib), **trace.shape))
    return TracedTable(torch=torch.__version__.split("+")[0], diffusers=diffusers.__version__,
                       transformers=transformers.__version__,
                       attention="fused kernel stand-in: output + float32 log-sum-exp, no score matrix",
                       points=points)


def committed_traced_table(path: Path = CALIBRATION_PATH) -> TracedTable:
    return TracedTable.model_validate(yaml.safe_load(path.read_text())["traced"])


def stale_points(fresh: TracedTable, committed: TracedTable, tolerance_gib: float = 2 / 1024) -> list[str]:
    """Points of ``fresh`` the committed table lacks or disagrees with by more than ``tolerance_gib``."""
    def key(p: TracedPoint):
        return p.module, p.stage, p.tokens, p.pixels, p.batch, p.images

    table = {key(p): p for p in committed.points}
    problems = []
    for point in fresh.points:
        old = table.get(key(point))
        if old is None:
            problems.append(f"{key(point)}: not in the committed table")
        elif abs(old.activations_gib - point.activations_gib) > tolerance_gib:
            problems.append(f"{key(point)}: committed {old.activations_gib} GiB, traced now {point.activations_gib}")
    return problems


def calibration_document(calibration: Calibration) -> str:
    """The YAML text of ``calibration`` (without the measurements, which have their own file); one line
    per traced point, so a re-trace reads as a small diff."""
    data = calibration.model_dump(mode="json", exclude={"measurements"}, exclude_none=True)
    points = data["traced"].pop("points")
    text = yaml.safe_dump(data, sort_keys=False, width=120)
    lines = ["  points:"] + [
        "  - " + yaml.safe_dump(point, default_flow_style=True, sort_keys=False, width=200).strip()
        for point in points]
    head, _, rest = text.partition("memory:\n")
    return HEADER + head + "\n".join(lines) + "\nmemory:\n" + rest


def write_calibration(trace: bool, path: Path = CALIBRATION_PATH) -> Calibration:
    """Re-trace (when ``trace``) or reuse the committed trace, refit, and write ``path``."""
    traced = traced_table() if trace else committed_traced_table(path)
    calibration = fit_all(traced, load_measurements())
    path.write_text(calibration_document(calibration))
    return calibration


def fit_report(calibration: Calibration) -> str:
    """The fitted terms and every measurement's residual, as text."""
    memory, timing = calibration.memory, calibration.timing
    lines = ["memory terms (fitted to measurements.yaml):"]
    for name in ("cuda_context_gib", "reserve_fraction", "resident_overhead_gib", "model_offload_overhead_gib"):
        term = getattr(memory, name)
        lines.append(f"  {name:<28} {term.value:>7.3f}  {term.description}")
    lines.append("memory residuals:")
    for r in memory.residuals:
        lines.append(f"  {r.measurement:<40} measured {r.measured_gib:>6.2f}  predicted {r.predicted_gib:>6.2f}"
                     f"  {100 * r.error_fraction:+6.1f}%")
    lines.append("time terms:")
    for e in timing.efficiency:
        lines.append(f"  efficiency {e.architecture}/{e.precision:<6} {e.value:>6.3f}  {e.source}")
    lines.append(f"  efficiency (others)       {timing.default_efficiency.value:>6.3f}  "
                 f"{timing.default_efficiency.description}")
    for module, term in timing.module_factor.items():
        lines.append(f"  x {module:<23} {term.value:>6.3f}  {term.description}")
    lines.append(f"  other s per megapixel     {timing.other_seconds_per_mpix.value:>6.3f}  "
                 f"{timing.other_seconds_per_mpix.description}")
    for key, term in timing.four_bit_speedup.items():
        lines.append(f"  4-bit speedup {key:<11} {term.value:>6.2f}  {term.description}")
    lines.append("time residuals:")
    for r in timing.residuals:
        step = 100 * (r["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"]
        line = (f"  {r['measurement']:<40} step measured {r['measured_step_s']:.3f} s  predicted "
                f"{r['predicted_step_s']:.3f} s  {step:+6.1f}%")
        if r["measured_s"] is not None:
            total = 100 * (r["predicted_s"] - r["measured_s"]) / r["measured_s"]
            line += f"; total {r['measured_s']:.2f} s, predicted {r['predicted_s']:.2f} s  {total:+6.1f}%"
        lines.append(line)
    return "\n".join(lines)
