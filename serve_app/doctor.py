"""``imageserve doctor``: what this machine has and what it would serve."""

from __future__ import annotations

import os
from typing import Any

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.compatibility import config_refusals
from serve_app.domain.config import AppConfig
from serve_app.domain.planner import plan
from serve_app.download import hub_cache_dir
from serve_app.engines import nunchaku_families
from serve_app.engines.hardware import (
    cpu_weights_gib,
    detect_local_gpu,
    free_disk_gb,
    hardware_refusal,
    host_memory_gib,
)
from serve_app.engines.nunchaku_support import compatibility, nunchaku_status


def download_need_gb(variants: list[ModelVariant]) -> float:
    """GB a first download of these variants fetches: each hub repo once (without its bf16
    transformer when only 4-bit variants use it), plus each nunchaku transformer file once."""
    need = 0.0
    by_repo: dict[str, list[ModelVariant]] = {}
    for v in variants:
        by_repo.setdefault(v.source.hub_repo or v.id, []).append(v)
    for group in by_repo.values():
        full = [v.source.download_gb for v in group if not v.requires_nunchaku and v.source.download_gb]
        if full:
            need += max(full)
        else:
            need += max((v.source.download_gb or 0) - (v.transformer.weights_gb or 0) for v in group)
        files = {v.source.transformer_file: v.transformer.weights_gb or 0 for v in group if v.requires_nunchaku}
        need += sum(files.values())
    return need


def run_doctor(config: AppConfig, cache_dir: str | None = None) -> dict[str, Any]:
    catalog = config.build_catalog()
    model_ids = config.models_to_load() or list(catalog.variants)
    variants = [catalog.variant(m) for m in model_ids]
    local = detect_local_gpu(catalog.gpus.values())
    nunchaku_ok, nunchaku_text = nunchaku_status()
    fit = compatibility(nunchaku_families())
    cache = hub_cache_dir(config, cache_dir)
    free_gb = free_disk_gb(cache)
    local_only = [
        v.id for v in variants
        if (config.models.get(v.id) and config.models[v.id].source and os.path.isdir(config.models[v.id].source))
    ]
    need_gb = download_need_gb([v for v in variants if v.id not in local_only])

    ram_gib = host_memory_gib()
    device = config.device.device
    on_cpu = device == "cpu" or local is None
    verdicts = []
    for v in variants:
        refusal = hardware_refusal(v, device, local is not None)
        if refusal is not None:
            if device == "cuda":
                what_to_do = "run on a GPU node, or set device: auto to run the bf16 variants on CPU"
            elif local is not None:  # device: cpu on a GPU machine
                what_to_do = "set device: auto to use this machine's GPU"
            else:
                what_to_do = "serve it on a GPU node"
            verdicts.append({"variant": v.id, "serves": False, "mode": None, "reason": f"{refusal}: {what_to_do}"})
        elif on_cpu:
            verdicts.append(_cpu_verdict(config, v, ram_gib, from_folder=v.id in local_only))
        else:
            verdicts.append(_gpu_verdict(config, v, local, nunchaku_ok, fit))

    report: dict[str, Any] = {
        "gpu": None if local is None else {
            "name": local.device_name, "vram_gib": round(local.vram_gib, 2),
            "compute_capability": local.compute_capability, "catalog_class": local.gpu_class.id,
            "in_catalog": local.in_catalog,
        },
        "host_memory_gib": round(ram_gib, 1),
        "device": device,
        "disk": {"cache_dir": cache, "free_gb": round(free_gb, 1), "download_needed_gb": round(need_gb, 1),
                 "enough": free_gb >= need_gb},
        "nunchaku": {"usable": nunchaku_ok, "detail": nunchaku_text, "compatibility": fit},
        "variants": verdicts,
    }
    refusals = config_refusals(config)
    report["refused_combinations"] = [str(refusal) for refusal in refusals]
    report["ok"] = any(v["serves"] for v in verdicts) and report["disk"]["enough"] and not refusals
    report["text"] = "\n".join(_report_lines(report, local is not None))
    return report


def _report_lines(report: dict[str, Any], has_gpu: bool) -> list[str]:
    """The report as doctor prints it."""
    device, fit = report["device"], report["nunchaku"]["compatibility"]
    nunchaku_ok, nunchaku_text = report["nunchaku"]["usable"], report["nunchaku"]["detail"]
    lines = []
    if not has_gpu and device == "cuda":
        lines.append("GPU:       none (CUDA not available), and the config says device: cuda: nothing serves here; "
                     "run on a GPU node, or set device: auto")
    elif not has_gpu:
        lines.append("GPU:       none (CUDA not available): bf16 pipelines run on CPU, slowly, if their weights fit in "
                     "RAM; 4-bit needs a GPU")
    else:
        g = report["gpu"]
        known = g["catalog_class"] if g["in_catalog"] else "not in the catalog; planned from its own properties"
        sm = g["compute_capability"].replace(".", "")
        on = "; the config says device: cpu, so pipelines run on CPU" if device == "cpu" else ""
        lines.append(f"GPU:       {g['name']}, {g['vram_gib']} GiB, sm_{sm} ({known}){on}")
    lines.append(f"Host RAM:  {report['host_memory_gib']} GiB")
    d = report["disk"]
    lines.append(f"Disk:      {d['free_gb']} GB free at {d['cache_dir']}; "
                 f"the chosen models need ~{d['download_needed_gb']} GB"
                 + ("" if d["enough"] else "  <-- NOT ENOUGH"))
    lines.append(f"nunchaku:  {'yes' if nunchaku_ok else 'no'}: {nunchaku_text}")
    if nunchaku_ok:
        lines.append(f"           with diffusers {fit['diffusers']}, torch {fit['torch']} (docs/compatibility.md):")
        for pipeline, verdict in fit["pipelines"].items():
            how = (f"works{' with adapters ' + ', '.join(verdict['adapters']) if verdict['adapters'] else ''}"
                   if verdict["works"] else f"does not work: {verdict['reason']}")
            lines.append(f"           {pipeline}: {how}")
    lines.append("Would serve:")
    for v in report["variants"]:
        if v["serves"]:
            extra = (f", peak ~{v['peak_vram_gib']:.1f} GiB" if v.get("peak_vram_gib")
                     else f", ~{v['host_ram_gib']:.1f} GiB of RAM" if v.get("host_ram_gib") else "")
            lines.append(f"  yes  {v['variant']} ({v['mode']}{extra})")
        else:
            lines.append(f"  no   {v['variant']}: {v['reason']}")
    if report["refused_combinations"]:
        lines.append("Refused combinations (the config does not load until they go; docs/compatibility.md):")
        lines += [f"  {refusal}" for refusal in report["refused_combinations"]]
    return lines


def _cpu_verdict(config: AppConfig, v: ModelVariant, ram_gib: float, from_folder: bool) -> dict[str, Any]:
    """Whether ``v`` loads on this machine's CPU: its weights, in the dtype it runs in there, and the host
    reserve the planner leaves to the OS, Python and Ray must fit in RAM."""
    if from_folder:  # the catalog's sizes are not that folder's (a tiny checkpoint, say): nothing to check against
        return {"variant": v.id, "serves": True, "mode": "cpu", "host_ram_gib": None, "reason": None}
    model = config.models.get(v.id)
    weights = cpu_weights_gib(v, model.torch_dtype if model else None)
    reserve = config.device.planner.host_reserve_gib
    need = round(weights + reserve, 1)
    if need <= ram_gib:
        return {"variant": v.id, "serves": True, "mode": "cpu", "host_ram_gib": need, "reason": None}
    reason = (f"on CPU its weights take {weights:.1f} GiB and the host reserve {reserve:g} GiB, {need:g} GiB in all; "
              f"this machine has {ram_gib:.1f} GiB: serve it on a GPU node, or on a machine with more RAM")
    return {"variant": v.id, "serves": False, "mode": None, "host_ram_gib": need, "reason": reason}


def _gpu_verdict(config: AppConfig, v: ModelVariant, local, nunchaku_ok: bool, fit: dict[str, Any]) -> dict[str, Any]:
    """Whether ``v`` fits the local GPU (the planner), and whether its nunchaku build runs here."""
    p = plan(v, local.gpu_class, config.defaults.width, config.defaults.height, settings=config.device.planner,
             batch_size=config.batch_size(v.id))
    reason = p.reason
    serves = p.fits
    if serves and v.requires_nunchaku and not nunchaku_ok:
        serves, reason = False, "needs the real nunchaku (not importable here)"
    elif serves and v.requires_nunchaku and not fit["pipelines"][v.pipeline]["works"]:
        serves, reason = False, (f"nunchaku {fit['nunchaku']} does not fit diffusers {fit['diffusers']}: "
                                 f"{fit['pipelines'][v.pipeline]['reason']}")
    return {"variant": v.id, "serves": serves, "mode": p.mode, "peak_vram_gib": p.peak_vram_gib, "reason": reason}
