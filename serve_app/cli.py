"""The ``imageserve`` command: plan, calibrate, doctor, download, make-tiny-models, run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from serve_app.domain.catalog import GPUClass
from serve_app.domain.config import AppConfig, ConfigError, parse_config
from serve_app.domain.config_files import load_config, load_fleet
from serve_app.domain.placement import plan_group_on
from serve_app.domain.planner import OFFLOAD_MODES, Plan, plan_table
from serve_app.domain.swapping import SwapPlan
from serve_app.examples import EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG

DEFAULT_TINY_DIR = Path(os.environ.get("IMAGESERVE_HOME", Path.home() / ".cache" / "imageserve")) / "tiny-models"


def _config(path: str | None, check_compatibility: bool = True) -> AppConfig:
    return load_config(path, check_compatibility) if path else parse_config({})


def _format_plans(plans: list[Plan], catalog) -> str:
    headers = ["GPU", "VRAM", "sm", "variant", "fits", "mode", "peak GiB", "why not"]
    rows = []
    previous = None
    for p in plans:
        gpu = catalog.gpus.get(p.gpu)
        name = gpu.name if gpu else p.gpu
        if previous is not None and previous != p.gpu:
            rows.append(None)
        previous = p.gpu
        rows.append([
            name,
            f"{gpu.vram_gib:g}" if gpu else "?",
            gpu.compute_capability if gpu else "?",
            p.variant,
            "yes" if p.fits else "no",
            p.mode or "-",
            f"{p.peak_vram_gib:.1f}" if p.peak_vram_gib is not None else "-",
            p.reason or "",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows if r)) for i, h in enumerate(headers[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths), "-" * 7)]
    lines += ["" if r is None else fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)


def explain_plan(p: Plan, catalog) -> str:
    """Every part of each mode's estimate, and where each part's figure comes from."""
    gpu = catalog.gpus.get(p.gpu)
    name = gpu.name if gpu else p.gpu
    vram = f"{gpu.vram_gib:g} GiB ({gpu.vram_reported_by})" if gpu else "?"
    verdict = (f"fits, {p.mode} offload, ~{p.seconds_per_image:.2f} s/image" if p.fits
               else f"does not fit: {p.reason}")
    lines = [f"{p.variant} on {name} ({vram}, {p.usable_vram_gib:g} usable), {p.width}x{p.height}, "
             f"{p.num_input_images} input image(s): {verdict}"]
    for mode, est in p.estimates.items():
        lines.append(f"  {mode}: {est.peak_gib:.2f} GiB at the {est.peak_stage} stage ({est.source})")
        for part in est.parts:
            lines.append(f"    {part.gib:>+8.3f} GiB  {part.name:<24} [{part.source}] {part.detail}")
    for mode, why in p.mode_reasons.items():
        if mode not in p.estimates:
            lines.append(f"  {mode}: {why}")
    return "\n".join(lines)


def _print_placement(config: AppConfig, fleet_path: str, as_json: bool) -> int:
    """The fleet's placement: which variant runs on which pool, in which mode, at what cost."""
    from serve_app.domain.placement import capacity_warnings, place

    fleet = load_fleet(fleet_path)
    if not config.models:  # no models configured: place the whole catalog
        config = parse_config({**config.model_dump(mode="json", exclude_unset=True),
                               "models": {v: {} for v in config.build_catalog().variants}})
    config = fleet.serve_with(config)
    placements, unplaced = place(config)
    rows = [{"variant": p.variant.id, "pool": p.pool.name, "gpu": p.gpu.name,
             "mode": p.parallel.offload_mode if p.parallel else p.plan.mode,
             "parallel": p.parallel.mode if p.parallel else None, "gpus_per_replica": p.gpus_per_replica,
             "peak_vram_gib": p.parallel.peak_vram_gib if p.parallel else p.plan.peak_vram_gib,
             "seconds_per_image": p.seconds_per_image} for p in placements]
    warnings = capacity_warnings(config, fleet, placements)
    if as_json:
        print(json.dumps({"placements": rows, "unplaced": unplaced, "warnings": warnings}, indent=2))
        return 0
    width = max(len(r["variant"]) for r in rows) if rows else 10
    print(f"{'variant':<{width}}  {'pool':<9} {'GPU':<10} {'mode':<6} {'GPUs':<5} {'peak GiB':>8} {'s/image':>8}")
    for r in rows:
        gpus = f"{r['parallel']}" if r["parallel"] else "1"
        print(f"{r['variant']:<{width}}  {r['pool']:<9} {r['gpu']:<10} {r['mode']:<6} {gpus:<5} "
              f"{r['peak_vram_gib']:>8.1f} {r['seconds_per_image']:>8.1f}")
    for variant, reason in unplaced.items():
        print(f"not served: {variant}: {reason}")
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if args.fleet:
        return _print_placement(config, args.fleet, args.json)
    catalog = config.build_catalog()
    if args.gpu == "auto":
        from serve_app.engines.hardware import detect_local_gpu

        local = detect_local_gpu(catalog.gpus.values())
        if local is None:
            print("no CUDA GPU here: `--gpu auto` has nothing to plan for (models run on CPU, unplanned)",
                  file=sys.stderr)
            return 1
        gpus = [local.gpu_class]
    elif args.gpu:
        gpus = [catalog.gpu(g) for g in args.gpu.split(",")]
    else:
        gpus = list(catalog.gpus.values())
    variants = ([catalog.variant(v) for v in args.variant.split(",")] if args.variant
                else list(catalog.variants.values()))
    modes = (args.mode,) if args.mode else OFFLOAD_MODES
    plans = plan_table(variants, gpus, args.width, args.height, args.images, modes=modes,
                       settings=config.device.planner)
    if args.gpus > 1:
        return _print_parallel(plans, catalog, args, config.device.planner)
    if args.json:
        print(json.dumps([p.model_dump(exclude={"estimates"} if not args.details else set()) for p in plans], indent=2))
    elif args.explain:
        print("\n\n".join(explain_plan(p, catalog) for p in plans))
    else:
        if gpus and gpus[0].id.startswith("local-"):
            catalog = catalog.model_copy(update={"gpus": {**catalog.gpus, gpus[0].id: gpus[0]}})
        print(_format_plans(plans, catalog))
        for group in config.swap_groups:
            for gpu in gpus:
                print()
                print(format_swap_plan(group.name, plan_group_on(config, catalog, group, gpu), gpu))
    return 0


def _print_parallel(plans: list[Plan], catalog, args: argparse.Namespace, settings) -> int:
    """``plan --gpus N``: each variant's one-GPU verdict, every parallel mode of an N-GPU node, and placement's pick."""
    from serve_app.domain.parallelism import choose_parallel, plan_parallel

    verdicts = []
    for one in plans:
        variant, gpu = catalog.variant(one.variant), catalog.gpu(one.gpu)
        modes = plan_parallel(variant, gpu, args.gpus, one.width, one.height, one.num_input_images, settings)
        verdicts.append((one, modes, choose_parallel(one, modes)))
    if args.json:
        print(json.dumps([{"one_gpu": one.model_dump(exclude={"estimates"}),
                           "parallel": [m.model_dump(exclude=set() if args.details else {"parts"}) for m in modes],
                           "placement": str(chosen.mode) if chosen else "one GPU"}
                          for one, modes, chosen in verdicts], indent=2))
        return 0
    blocks = [format_parallel_plans(one, modes, chosen, catalog.gpu(one.gpu), args.gpus)
              for one, modes, chosen in verdicts]
    print("\n\n".join(blocks))
    return 0


def format_parallel_plans(one: Plan, modes, chosen, gpu: GPUClass, gpus: int) -> str:
    """One variant on a node of ``gpus`` GPUs: one GPU and every parallel mode (docs/multi-gpu.md shows these)."""
    single = (f"{one.mode} offload, {one.peak_vram_gib:g} GiB, {one.seconds_per_image:g} s per image" if one.fits
              else f"does not fit: {one.reason}")
    lines = [f"{one.variant} on {gpus} x {gpu.name} ({one.usable_vram_gib:g} GiB usable each, {one.width}x{one.height}"
             f", peer link {gpu.peer.kind} {gpu.peer.gbps:g} GB/s)", f"  one GPU: {single}"]
    rows = [("mode", "fits", "offload", "GiB/GPU", "s/image", "denoise s", "exchange s", "GPU-s/image", "why not")]
    for m in modes:
        sec = m.seconds
        rows.append((m.mode, "yes" if m.fits else "no", m.offload_mode or "-",
                     f"{m.peak_vram_gib:g}" if m.peak_vram_gib is not None else "-",
                     f"{sec.total_s:g}" if sec else "-", f"{sec.denoise_s:g}" if sec else "-",
                     f"{sec.communication_s:g}" if sec else "-",
                     f"{m.gpu_seconds_per_image:g}" if sec else "-", m.reason or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"  placement: {chosen.mode} ({chosen.offload_mode} offload)" if chosen else
                 "  placement: one-GPU replicas" + (" (each fits without streaming weights)"
                                                    if one.fits and one.mode != "sequential" else
                                                    " (no parallel mode fits and beats one GPU)"))
    return "\n".join(lines)


def format_swap_plan(name: str, verdict: SwapPlan, gpu: GPUClass) -> str:
    """A swap group's plan on one GPU as a small table (docs/single-gpu.md shows these)."""
    if not verdict.fits:
        how = f"refused: {verdict.reason}"
    else:
        how = "all stay on the GPU, no swaps" if verdict.co_resident else "one at a time on the GPU, swapping"
    lines = [f"swap group {name} on {gpu.name} ({verdict.usable_vram_gib:g} GiB usable, host link "
             f"{verdict.link_gbps:g} GB/s): {how}"]
    rows = [("variant", "mode", "peak GiB", "on GPU GiB", "host GiB", "swap in s", "cold start s")]
    rows += [(m.variant, m.mode, f"{m.peak_vram_gib:g}", f"{m.gpu_resident_gib:g}", f"{m.host_gib:g}",
              f"{m.swap_in_s:g}", f"{m.cold_start_s:g}") for m in verdict.members]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    ram = f" of {verdict.host_ram_gib:g}" if verdict.host_ram_gib is not None else " (host_ram_gib not set: unchecked)"
    lines.append(f"  host RAM: {verdict.host_needed_gib:g} GiB needed{ram}")
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from serve_app.calibrate import committed_traced_table, fit_report, stale_points, traced_table, write_calibration
    from serve_app.domain.calibration import CALIBRATION_PATH, default_calibration

    if args.check:
        problems = stale_points(traced_table(quick=True), committed_traced_table())
        for problem in problems:
            print(f"stale: {problem}")
        print("the committed trace is stale: run `imageserve calibrate --trace`" if problems
              else "the committed trace matches a fresh one")
        return 1 if problems else 0
    if args.trace or args.fit:
        calibration = write_calibration(trace=args.trace)
        print(f"wrote {CALIBRATION_PATH}")
    else:
        calibration = default_calibration()
    print(fit_report(calibration))
    return 0


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from serve_app.engines.random_weights import build_all

    for kind, path in build_all(args.dir, force=args.force).items():
        print(f"{kind}: {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from serve_app.doctor import run_doctor

    # A config with combinations that cannot work still gets its report, which lists them.
    report = run_doctor(_config(args.config, check_compatibility=False), cache_dir=args.cache_dir)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0 if report["ok"] else 1


def cmd_download(args: argparse.Namespace) -> int:
    # The one command that goes online; huggingface_hub reads HF_HUB_OFFLINE once, when first imported.
    os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        print("imageserve: huggingface_hub was imported in offline mode before the download", file=sys.stderr)
        return 2
    from serve_app.download import DownloadError, download

    config = load_config(args.config)
    try:
        report = download(config, cache_dir=args.cache_dir, keep_free_gb=args.keep_free_gb, dry_run=args.dry_run,
                          log=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    except DownloadError as err:
        print(f"imageserve download: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.dry_run:
        print(f"done: serve offline from this cache (hf.offline: true, hf.cache_dir: {report['cache_dir']})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from serve_app.embedded import embedded_config
    from serve_app.runner import run_foreground

    config = load_config(args.config) if args.config else embedded_config(Path(args.tiny_dir))
    loaders = None
    if args.config and _serve_tiny(args.tiny):
        from serve_app.embedded import on_tiny_checkpoints

        config, loaders, dropped = on_tiny_checkpoints(config, Path(args.tiny_dir))
        print(f"imageserve run: serving {args.config}'s variants from tiny random-weight checkpoints on CPU "
              f"(--tiny {args.tiny}); their images are noise. On a GPU node, or with --tiny never, the "
              "configured weights load.", flush=True)
        for line in dropped:
            print(f"imageserve run: left out on CPU: {line}", flush=True)
    if args.host or args.port:
        serving = config.serving.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
        config = config.model_copy(update={"serving": serving})
    # Checked before Ray starts: later a replica refuses after a minute of loading, in the controller's tracebacks,
    # or, with a key file it cannot read or that holds no key, the service starts and refuses every request.
    keys = _key_ring(config)
    problem = _hardware_problem(config, set(loaders or ()), bool(args.config)) or _keys_problem(config, keys)
    if problem:
        print(f"imageserve run: {problem}", file=sys.stderr)
        return 2
    return run_foreground(config, loaders, keyed=keys.configured, verbose=args.verbose)


def _key_ring(config: AppConfig):
    """The router's keys, read here in silence: the check below says in one line what is wrong with them, and
    where nothing is, the router itself warns about an open endpoint once it runs."""
    import logging

    from serve_app.api_keys import config_key_ring

    api_keys_log = logging.getLogger("serve_app.api_keys")
    was_disabled, api_keys_log.disabled = api_keys_log.disabled, True
    try:
        return config_key_ring(config)
    finally:
        api_keys_log.disabled = was_disabled


def _keys_problem(config: AppConfig, keys) -> str | None:
    from serve_app.api_keys import API_KEYS_ENV, refuse_open_non_loopback

    try:
        refuse_open_non_loopback(keys, config.serving.host, config.serving.public)
    except PermissionError as err:
        return str(err)
    # Either would start a service that refuses every request.
    keys_file = config.serving.api_keys_file
    unreadable = keys.unavailable()
    if unreadable:
        return (f"serving.api_keys_file {keys_file}: {unreadable}: write one key a line there, or leave "
                "serving.api_keys_file out (docs/security.md)")
    if keys.configured and not keys.digests():
        return (f"the configured API key sources ({keys_file or API_KEYS_ENV}) hold no key, so every request would "
                f"be refused: write one key a line in serving.api_keys_file, or set {API_KEYS_ENV}")
    return None


def _hardware_problem(config: AppConfig, doubled: set[str], tiny_applies: bool) -> str | None:
    """Why ``config``'s variants cannot load on this machine (no CUDA GPU for device: cuda or a 4-bit variant);
    ``doubled``: variants whose loader is replaced (``--tiny``'s 4-bit ones, which run without nunchaku)."""
    from serve_app.engines.hardware import cuda_available, hardware_refusal

    catalog = config.build_catalog()
    has_cuda = cuda_available()
    refusals = dict.fromkeys(
        r for v in config.models_to_load() if v not in doubled
        if (r := hardware_refusal(catalog.variant(v), config.device.device, has_cuda)) is not None)
    if not refusals:
        return None
    tiny = ", or try it here on tiny random-weight checkpoints with --tiny auto" if tiny_applies else ""
    return f"{'; '.join(refusals)}: run it on a GPU node{tiny}"


def _serve_tiny(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    from serve_app.engines.hardware import cuda_available

    return not cuda_available()


def cmd_cluster_sim(args: argparse.Namespace) -> int:
    from cluster.simulate import run_simulation

    with report_stream(args.json) as report:
        result = run_simulation(args.fleet, args.requests, Path(args.tiny_dir), port=args.port,
                                concurrency=args.concurrency)
        if args.json:
            print(json.dumps(result), file=report)
    if not args.json:
        print(f"requests {result['requests']}  ok {result['ok']}  errors {result['errors']}  "
              f"misroutes {result['misroutes']}  (start-up {result['startup_s']} s, total {result['total_s']} s)")
        for pool, count in sorted(result["per_pool"].items()):
            print(f"  {pool:<10} {count}")
        for key, count in result["per_variant_pool"].items():
            print(f"    {key:<64} {count}")
        for sample in result["error_samples"]:
            print(f"  error: {sample}")
    return 0 if result["errors"] == 0 and result["misroutes"] == 0 else 1


@contextlib.contextmanager
def report_stream(only_report: bool) -> Iterator[TextIO]:
    """Where to print a report. With ``only_report`` (--json), everything else written to file descriptor 1
    while it is open goes to stderr instead: Ray's processes inherit the descriptor and its driver prints their
    lines to stdout, so the report alone stays on stdout, one JSON object to parse."""
    if not only_report:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as real_stdout:
            yield real_stdout
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_cluster_configs(args: argparse.Namespace) -> int:
    from cluster.configs import DEFAULT_IMAGE, DEFAULT_REDIS_ADDRESS, write_configs

    args.image = args.image or DEFAULT_IMAGE
    redis_address = DEFAULT_REDIS_ADDRESS if args.redis is None else (args.redis or None)
    for path in write_configs(args.fleet, args.config, args.serve_config_out, args.manifests_out,
                              redis_address, args.image):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_plan, _add_calibrate, _add_make_tiny_models, _add_doctor, _add_download, _add_run,
                _add_cluster_sim, _add_cluster_configs):
        add(sub)
    return parser


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="GPU x variant VRAM plan: which variants fit which GPUs, in which offload mode")
    p.add_argument("--config", help="YAML config (adds GPU classes/variants, planner margins)")
    p.add_argument("--gpu", help="comma-separated GPU ids or names, or 'auto' for the local GPU (default: all)")
    p.add_argument("--variant", help="comma-separated variant ids (default: all)")
    p.add_argument("--width", type=int, help="output width (default: each variant's)")
    p.add_argument("--height", type=int, help="output height (default: each variant's)")
    p.add_argument("--images", type=int, help="input images per edit request (default 1)")
    p.add_argument("--mode", choices=OFFLOAD_MODES, help="force one offload mode")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs per node: also plan every multi-GPU mode (cp2, tp4, ...) such a node can hold")
    p.add_argument("--json", action="store_true", help="print a JSON list of plan objects")
    p.add_argument("--details", action="store_true", help="with --json: include the per-mode estimate parts")
    p.add_argument("--explain", action="store_true",
                   help="show every part of each estimate and its source: traced, fitted, measured or catalog")
    p.add_argument("--fleet", nargs="?", const=str(EXAMPLE_FLEET),
                   help="fleet file (the example fleet when no path is given): print which variants each GPU pool "
                        "hosts (placement) instead")
    p.set_defaults(func=cmd_plan)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="the planner's calibration: print the fit, or regenerate it")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--trace", action="store_true",
                      help="re-trace every stage at full size on the meta device (~2 min), refit, "
                           "write calibration.yaml")
    what.add_argument("--fit", action="store_true", help="refit to measurements.yaml and write calibration.yaml")
    what.add_argument("--check", action="store_true",
                      help="re-trace the smallest shapes and fail if the committed trace disagrees")
    p.set_defaults(func=cmd_calibrate)


def _add_make_tiny_models(sub) -> None:
    p = sub.add_parser("make-tiny-models", help="build tiny random-weight checkpoints offline")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_TINY_DIR))
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_make_tiny_models)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="preflight: GPU, RAM, disk, nunchaku, and what this machine would serve")
    p.add_argument("--config", help="YAML config (its models are checked; default: the whole catalog)")
    p.add_argument("--cache-dir", help="where weights would be downloaded (default: the HF cache)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch exactly the weight files a config's variants load, and verify them")
    p.add_argument("--config", default=str(EXAMPLE_PRODUCTION_CONFIG),
                   help="YAML config whose models to fetch (default: the example production config)")
    p.add_argument("--cache-dir", help="Hugging Face cache to fill (default: the config's hf.cache_dir, else HF's)")
    p.add_argument("--keep-free-gb", type=float, default=5.0, help="refuse unless this much disk stays free after")
    p.add_argument("--dry-run", action="store_true", help="say what would be fetched and check the disk; fetch nothing")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout (progress on stderr)")
    p.set_defaults(func=cmd_download)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="serve in the foreground on a private local Ray (embedded tiny default)")
    p.add_argument("--config", help="YAML config to serve (default: the embedded CPU default with tiny models)")
    p.add_argument("--tiny-dir", default=str(DEFAULT_TINY_DIR), help="where the embedded default keeps tiny models")
    p.add_argument("--tiny", choices=("auto", "always", "never"), default="auto",
                   help="with --config: serve its variants from tiny random-weight checkpoints on CPU (4-bit ones "
                        "without nunchaku): 'auto' does when torch sees no CUDA GPU (default auto)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--verbose", action="store_true",
                   help="also Serve's INFO logs (deployments, replicas, the probes' access lines) and library import "
                        "notices")
    p.set_defaults(func=cmd_run)


def _add_cluster_sim(sub) -> None:
    p = sub.add_parser("cluster-sim", help="simulate a mixed GPU fleet locally and send it mixed traffic")
    p.add_argument("--fleet", default=str(EXAMPLE_FLEET), help="fleet file (default: the example fleet)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--port", type=int, default=8765, help="HTTP port of the simulated fleet (0: any free port)")
    p.add_argument("--tiny-dir", default=str(DEFAULT_TINY_DIR))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cluster_sim)


def _add_cluster_configs(sub) -> None:
    p = sub.add_parser("cluster-configs", help="write serve_config.yaml and the cluster configs for a fleet")
    p.add_argument("--fleet", default=str(EXAMPLE_FLEET), help="fleet file (default: the example fleet)")
    p.add_argument("--config", default=str(EXAMPLE_PRODUCTION_CONFIG),
                   help="imageserve config to serve on it (default: the example production config)")
    p.add_argument("--serve-config-out", default="serve_config.yaml", help="where to write the Ray Serve config")
    p.add_argument("--manifests-out", default="cluster/deploy",
                   help="folder for ray-cluster.yaml, kuberay-rayservice.yaml and the other manifests (where "
                        "docs/deploy.md applies them from)")
    p.add_argument("--redis", default=None,
                   help="GCS fault-tolerance Redis address, rediss:// for TLS ('' to leave it off); the default is "
                        "the Redis of cluster/deploy/redis.yaml")
    p.add_argument("--image", default=None,
                   help="container image of every node, built from the Dockerfile (default: imageserve:VERSION, "
                        "what `make image` tags)")
    p.set_defaults(func=cmd_cluster_configs)


def missing_file_problem(option: str, path: str | None) -> str | None:
    """One line for a --config or --fleet that names no file: where it was looked for, and what to give instead
    (the packaged example of that name, when there is one)."""
    if path is None or Path(path).is_file():
        return None
    where = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    packaged = {example.name: example for example in (EXAMPLE_PRODUCTION_CONFIG, EXAMPLE_FLEET)}
    if Path(path).name in packaged:
        return f"{option} {path}: no such file at {where}; the example {Path(path).name} is {packaged[Path(path).name]}"
    what = "fleet file" if option == "--fleet" else "YAML config"
    return f"{option} {path}: no such file at {where}; give the path of an existing {what}"


def main(argv: list[str] | None = None) -> int:
    # Every Ray cluster here is started explicitly; nothing should auto-connect to one after shutdown.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    from serve_app.runner import quiet_torchao_notice

    # torchao's notice about its C++ extensions comes with diffusers' import; this process runs no fp8 pipeline.
    quiet_torchao_notice()
    args = build_parser().parse_args(argv)
    for option in ("config", "fleet"):
        problem = missing_file_problem(f"--{option}", getattr(args, option, None))
        if problem:
            print(f"imageserve: {problem}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ConfigError, KeyError) as err:
        print(f"imageserve: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
