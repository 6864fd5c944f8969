"""Fit what a trace cannot see to what GPUs were measured doing, and report the residuals.

Memory: every measurement becomes one equation, ``measured - traced = terms``, where the terms are

* ``cuda_context_gib`` (every per-process NVML figure carries it),
* ``reserve_fraction`` x the peak stage's activations (the caching allocator's reserve over allocations),
* ``resident_overhead_gib`` (everything resident: the stages' cached blocks do not all reuse each other),
* ``model_offload_overhead_gib`` (model offload: modules swapping through the cache).

They are solved by non-negative least squares on relative error, so a 2 GiB figure weighs as much as a
25 GiB one. Time: each measured step gives an efficiency (FLOPs over time over the catalog's TFLOPS),
modelled as a term for the GPU's architecture and precision times a term for the transformer, and the
time outside the denoising loop is fitted per megapixel.
"""

from __future__ import annotations

import math

from serve_app.domain.calibration import (
    Calibration,
    Efficiency,
    FittedTerm,
    Measurement,
    Measurements,
    MemoryFit,
    Residual,
    TimingFit,
    TracedTable,
    nonnegative_least_squares,
    solve_normal_equations,
)
from serve_app.domain.catalog import GIB, Catalog, default_catalog
from serve_app.domain.planner import estimate_seconds, estimate_vram
from serve_app.domain.shapes import MPIX, transformer_tokens

MEMORY_TERMS = {
    "cuda_context_gib": "CUDA context, cuBLAS/cuDNN workspaces and kernels loaded, per process (fitted)",
    "reserve_fraction": "caching allocator's reserve over allocated, per GiB of the peak stage's activations (fitted)",
    "resident_overhead_gib": "held beyond the largest stage when every stage stays resident (fitted)",
    "model_offload_overhead_gib": "held beyond the resident module under model offload (fitted)",
}


def _zero_memory_fit() -> MemoryFit:
    return MemoryFit(**{name: FittedTerm(value=0.0, description=text) for name, text in MEMORY_TERMS.items()},
                     residuals=[])


def _zero_timing_fit() -> TimingFit:
    return TimingFit(efficiency=[], default_efficiency=FittedTerm(value=1.0, description="unfitted"),
                     four_bit_speedup={"default": FittedTerm(value=1.0, description="unfitted")},
                     other_seconds_per_mpix=FittedTerm(value=0.0, description="unfitted"), residuals=[])


def _assumed_speedups(measurements: Measurements) -> dict[str, FittedTerm]:
    return {key: FittedTerm(value=item.value, description=item.source)
            for key, item in measurements.assumed.get("four_bit_speedup", {}).items()}


def _module_weights_gib(catalog: Catalog, module: str, torch_dtype: str) -> float:
    dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(torch_dtype, "bf16")
    for variant in catalog.variants.values():
        for component in variant.components.values():
            if component.traced_module == module and not component.quantized:
                return component.weight_bytes(dtype) / GIB
    raise KeyError(f"no catalog component is the traced module {module!r}")


def memory_row(m: Measurement, traced: TracedTable, catalog: Catalog) -> tuple[float, list[float]]:
    """(what the trace and the catalog account for, the coefficients of the fitted terms) for one figure."""
    nvml = 1.0 if m.quantity == "nvml" else 0.0
    reserve = 0.0 if m.quantity == "allocated" else 1.0
    if m.scope == "stage":
        size = m.width * m.height if m.stage in ("vae_decode", "vae_encode") else 0
        acts = traced.activations(m.module, m.stage, size, m.batch_size)
        if acts is None:
            raise ValueError(f"{m.id}: {m.module} {m.stage} was never traced")
        base = _module_weights_gib(catalog, m.module, m.torch_dtype) + acts
        return base, [nvml, reserve * acts, 0.0, 0.0]
    zero = Calibration(traced=traced, memory=_zero_memory_fit(), timing=_zero_timing_fit())
    est = estimate_vram(catalog.variant(m.variant), m.mode, m.width, m.height, m.num_input_images, m.torch_dtype,
                        batch_size=m.batch_size, calibration=zero)
    return est.peak_gib, [nvml, reserve * est.activations_gib, nvml * (m.mode == "none"),
                          nvml * (m.mode == "model")]


def fit_memory(traced: TracedTable, measurements: Measurements, catalog: Catalog | None = None) -> MemoryFit:
    catalog = catalog or default_catalog()
    rows, targets, bases = [], [], []
    for m in measurements.memory:
        base, coefficients = memory_row(m, traced, catalog)
        bases.append(base)
        rows.append([c / m.gib for c in coefficients])
        targets.append((m.gib - base) / m.gib)
    solution = nonnegative_least_squares(rows, targets) if rows else [0.0] * len(MEMORY_TERMS)
    residuals = []
    for m, base, row in zip(measurements.memory, bases, rows, strict=True):
        predicted = base + sum(c * m.gib * x for c, x in zip(row, solution, strict=True))
        residuals.append(Residual(measurement=m.id, measured_gib=m.gib, predicted_gib=round(predicted, 3)))
    terms = {name: FittedTerm(value=round(value, 4), description=text)
             for (name, text), value in zip(MEMORY_TERMS.items(), solution, strict=True)}
    return MemoryFit(**terms, residuals=residuals)


def fit_timing(traced: TracedTable, measurements: Measurements, catalog: Catalog | None = None) -> TimingFit:
    """Efficiency = architecture term x transformer term, fitted in log space by least squares; the first
    transformer measured is the reference (factor 1). Time outside the denoising loop: per megapixel."""
    catalog = catalog or default_catalog()
    observed = []  # (architecture, precision, module, efficiency, id)
    others: list[tuple[float, float]] = []
    for t in measurements.timing:
        variant, gpu = catalog.variant(t.variant), catalog.gpu(t.gpu)
        tokens = transformer_tokens(t.width, t.height, t.num_input_images)
        spec = variant.transformer
        flop = spec.flops_per_token * tokens + spec.attention_flops_per_token_sq * tokens**2
        per_step = flop * (2 if variant.runs_cfg() else 1)
        efficiency = per_step / (t.seconds_per_step * gpu.bf16_tflops * 1e12)
        observed.append((gpu.architecture, variant.precision, spec.traced_module, efficiency, t.id))
        if t.total_s is not None:
            others.append((t.total_s - t.num_inference_steps * t.seconds_per_step,
                           t.width * t.height / MPIX + t.num_input_images))
    classes = sorted({(arch, precision) for arch, precision, *_ in observed})
    modules = list(dict.fromkeys(module for _, _, module, _, _ in observed))[1:]  # the first is the reference
    rows = [[1.0 if (arch, precision) == c else 0.0 for c in classes] + [1.0 if module == m else 0.0 for m in modules]
            for arch, precision, module, _, _ in observed]
    solution = solve_normal_equations(rows, [math.log(e) for *_, e, _ in observed]) if rows else []
    solution = solution or [0.0] * (len(classes) + len(modules))
    efficiencies = [Efficiency(architecture=arch, precision=precision, value=round(math.exp(value), 3),
                               source="fitted: " + ", ".join(name for a, p, _, _, name in observed
                                                              if (a, p) == (arch, precision)))
                    for (arch, precision), value in zip(classes, solution, strict=False)]
    def fitted_from(module: str) -> str:
        return "fitted: " + ", ".join(name for *_, m, _, name in observed if m == module)

    factors = {module: FittedTerm(value=round(math.exp(value), 3), description=fitted_from(module))
               for module, value in zip(modules, solution[len(classes):], strict=True)}
    lowest = min(efficiencies, key=lambda e: e.value, default=None)
    default = (FittedTerm(value=lowest.value, description=f"no measurement for this architecture: assumed "
                                                          f"{lowest.architecture}'s {lowest.value}, the lowest fitted")
               if lowest else FittedTerm(value=0.4, description="no timing measurement at all (est.)"))
    per_mpix = max(0.0, sum(o * x for o, x in others) / sum(x * x for _, x in others)) if others else 0.0
    other = FittedTerm(value=round(per_mpix, 4),
                       description="text encoder, VAE and pipeline time per output+input megapixel (fitted)")
    fit = TimingFit(efficiency=efficiencies, default_efficiency=default, module_factor=factors,
                    four_bit_speedup=_assumed_speedups(measurements), other_seconds_per_mpix=other, residuals=[])
    calibration = Calibration(traced=traced, memory=_zero_memory_fit(), timing=fit)
    residuals = []
    for t in measurements.timing:
        est = estimate_seconds(catalog.variant(t.variant), catalog.gpu(t.gpu), "none", t.width, t.height,
                               t.num_input_images, t.num_inference_steps, calibration=calibration)
        residuals.append({"measurement": t.id, "measured_step_s": t.seconds_per_step,
                          "predicted_step_s": round(est.denoise_s / t.num_inference_steps, 4),
                          "measured_s": t.total_s, "predicted_s": est.total_s if t.total_s is not None else None})
    return fit.model_copy(update={"residuals": residuals})


def fit_all(traced: TracedTable, measurements: Measurements) -> Calibration:
    """A calibration from a traced table and the measurements: both fits, residuals included."""
    return Calibration(traced=traced, memory=fit_memory(traced, measurements),
                       timing=fit_timing(traced, measurements), measurements=measurements)
