"""Full-size random-weight models on a GPU: stage seconds and peak VRAM against the planner, speed options,
and the service (one replica, handle path) against the direct pipeline call, all in one run.

Every path only a GPU runs gets exercised: each offload mode (--modes), each attention backend with
the calls that carry a mask or a second stream (CFG, and for generation a batch of prompts of
different lengths), compile with the replica's warm-up (does the first request compile again?),
cancellation (time from the stop signal to the return, and whether the VAE decode was skipped), and a
swap group's park and restore (pinned host copies; the same image after). fp8 variants
(``--variants z-image-turbo-fp8``) run torchao's fp8 matmuls: per-row scales, per-tensor on sm_120.

Models are built in memory from the architecture numbers of docs/facts.md (``serve_app.engines.random_weights``
at size "full": same classes, parameter counts, FLOPs and memory as the real weights) by the same
``RandomWeightLoader`` a replica uses, so nothing is downloaded.

    .venv/bin/python -m bench.gpu_fullsize [--variants z-image-turbo,qwen-image-edit-2509] [--modes none,model]
        [--size 1024] [--steps 8] [--options sdpa-flash,sdpa-cudnn,sdpa-efficient,vae-channels-last,compile]
        [--repeats 2] [--no-service] [--json] [--record]
    .venv/bin/python -m bench.gpu_fullsize --smoke [--json]   # tiny dims on CPU: every code path, in seconds
    .venv/bin/python -m bench.gpu_fullsize --parallel cp2,tp2 [--variants qwen-image-edit-2511]
        # one process per GPU of this machine, against the one-GPU row of the same run and the planner

With ``--parallel``, each mode runs its ranks (one process per GPU, joined over NCCL; over gloo on CPU with
``--smoke``) on the same request, and rank 0's seconds and peak memory are set beside the planner's
(``serve_app.domain.parallelism``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, run_ranks, run_reporting
from serve_app.domain.calibration import MEASURED_DIR
from serve_app.domain.catalog import GIB

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
EDIT_PROMPT = "make the sky stormy and add a red boat"
# Option name -> what it changes (an attention backend, or one of OptimizationConfig's switches).
OPTIONS = {
    "sdpa-flash": "_native_flash", "sdpa-cudnn": "_native_cudnn", "sdpa-efficient": "_native_efficient",
    "sdpa-math": "_native_math", "vae-channels-last": None, "compile": None,
}
SMOKE_EDIT_AREAS = {"edit_vae_image_area": 64 * 64, "edit_condition_image_area": 56 * 56}


def csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def bench_config(args, variant_id: str, mode: str):
    from serve_app.domain.config import parse_config

    model = {"offload_mode": mode, **(SMOKE_EDIT_AREAS if args.smoke else {})}
    return parse_config({
        "device": {"device": args.device},
        "defaults": {"width": args.size, "height": args.size},
        "models": {variant_id: model},
        "serving": {"warmup": True, "torch_threads": 1 if args.smoke else None,
                    "deployment": {"num_replicas": 1, "num_cpus": 0, "num_gpus": 1 if args.device == "cuda" else 0}},
    }, "gpu_fullsize bench")


class Runner:
    """Calls one loaded engine with the bench's request and measures it."""

    def __init__(self, engine, args) -> None:
        from PIL import Image

        self.engine = engine
        self.args = args
        self.cuda = engine.info.device == "cuda"
        self.inputs = [Image.new("RGB", (args.size, args.size), (90, 120, 200))]

    def call(self, steps: int):
        kwargs = dict(width=self.args.size, height=self.args.size, num_inference_steps=steps, seed=0)
        if self.engine.variant.tasks == ("generate",):
            return self.engine.generate(PROMPT, **kwargs)
        return self.engine.edit(self.inputs, EDIT_PROMPT, **kwargs)

    def measure(self, repeats: int) -> dict:
        import torch

        self.call(self.engine.variant.min_inference_steps)  # warm-up: kernels, allocator, lazy init
        rows = []
        for _ in range(repeats):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = self.call(self.args.steps)
            if self.cuda:
                torch.cuda.synchronize()
            rows.append({**result.timings, "wall_s": time.perf_counter() - started})
        row = {key: round(statistics.median(r[key] for r in rows if key in r), 4) for key in rows[0]}
        row["forwards"] = self.forwards()
        row["transformer_forward_s"] = round(row["denoise_s"] / row["forwards"], 4)
        if self.cuda:
            row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
            # What NVML would have shown at the peak: the allocator's peak reserve plus what the process holds
            # outside the allocator (CUDA context, cuBLAS/cuDNN workspaces), read now as device use less reserve.
            free, total = torch.cuda.mem_get_info()
            outside = (total - free) - torch.cuda.memory_reserved()
            row["peak_process_gib"] = round((torch.cuda.max_memory_reserved() + outside) / GIB, 2)
        return row

    def forwards(self) -> int:
        return self.args.steps * (2 if self.engine.variant.runs_cfg() else 1)

    def masked_calls(self) -> dict:
        """The calls that hand the attention a mask or a second stream: CFG, and (generation) a batch of
        prompts of different lengths. A backend that cannot take them says so here, as a result."""
        size = dict(width=self.args.size, height=self.args.size,
                    num_inference_steps=self.engine.variant.min_inference_steps, seed=0)
        if self.engine.variant.tasks == ("generate",):
            calls = {"cfg": lambda: self.engine.generate(PROMPT, guidance_scale=3.0, **size),
                     "batch_2": lambda: self.engine.generate([PROMPT, "a dog"], **{**size, "seed": [0, 1]})}
        else:
            calls = {"cfg": lambda: self.engine.edit(self.inputs, EDIT_PROMPT, true_cfg_scale=4.0, **size)}
        outcomes = {}
        for name, call in calls.items():
            try:
                call()
                outcomes[name] = "ok"
            except Exception as err:  # noqa: BLE001 - a backend refusing a mask is a result, not a crash
                outcomes[name] = f"{type(err).__name__}: {err}"[:200]
        return outcomes

    def cancellation(self) -> dict:
        """How long a call takes to end after its caller leaves: stop after the first step, time from the
        stop signal to the return, and whether the VAE decode was skipped."""
        import torch

        from serve_app.engines.protocol import GenerationCancelled

        stopped_at: list[float] = []

        def stop_after_first_step() -> bool:
            stopped_at.append(time.perf_counter())
            return True

        kwargs = dict(width=self.args.size, height=self.args.size, num_inference_steps=self.args.steps, seed=0,
                      should_stop=stop_after_first_step)
        try:
            if self.engine.variant.tasks == ("generate",):
                self.engine.generate(PROMPT, **kwargs)
            else:
                self.engine.edit(self.inputs, EDIT_PROMPT, **kwargs)
        except GenerationCancelled as stop:
            if self.cuda:
                torch.cuda.synchronize()
            return {"stopped": str(stop), "after_stop_s": round(time.perf_counter() - stopped_at[0], 4),
                    "decode_skipped": "vae_decode_s" not in self.engine._timer.seconds}
        return {"stopped": False}


def swap_round_trip(runner: Runner) -> dict:
    """What a swap group does to a resident member: park every weight in host RAM (one flat buffer per module,
    page-locked in place by cudaHostRegister), then copy it back; seconds, bytes, the link rate it reached, the
    host RAM it took against the weights, and whether the next image is the one before."""
    import numpy as np

    engine = runner.engine
    before = np.asarray(runner.call(engine.variant.min_inference_steps).images[0])
    started = time.perf_counter()
    freed = engine.park()
    parked_s = time.perf_counter() - started
    started = time.perf_counter()
    copied = engine.unpark()
    unpark_s = time.perf_counter() - started
    after = np.asarray(runner.call(engine.variant.min_inference_steps).images[0])
    copies = engine._host_copies
    return {"park_s": round(parked_s, 3), "unpark_s": round(unpark_s, 3), "bytes_freed": freed,
            "bytes_copied": copied, "unpark_gbps": round(copied / unpark_s / 1e9, 2) if copied else None,
            "host_gib": round(copies.host_bytes / GIB, 3) if copies else 0.0,
            "pinned_gib": round(copies.pinned_bytes / GIB, 3) if copies else 0.0,
            "same_image_after": bool(np.array_equal(before, after))}


def with_option(runner: Runner, name: str, base: dict) -> dict:
    """Measure ``runner`` with one option on, against ``base``; the option is undone afterwards
    (except compile, which is measured last)."""
    from serve_app.engines.optimizations import set_channels_last

    pipe = runner.engine.pipe
    row: dict = {}
    if OPTIONS[name] is not None:
        try:
            pipe.transformer.set_attention_backend(OPTIONS[name])
        except Exception as err:  # noqa: BLE001 - a backend this GPU/torch lacks is a result, not a crash
            return {"error": f"{type(err).__name__}: {err}"[:300]}
    elif name == "vae-channels-last":
        set_channels_last(pipe.vae)
    elif name == "compile":
        # As a compiled replica does: warm up at the serving size, then see whether the first real
        # request compiles again (it would if the warm-up shape differed).
        pipe.transformer.compile()
        engine = runner.engine
        engine.spec = engine.spec.model_copy(update={
            "optimizations": engine.spec.optimizations.model_copy(update={"compile_transformer": True})})
        started = time.perf_counter()
        engine.warm_up()
        row["compile_s"] = round(time.perf_counter() - started, 2)
        row["warm_up_size"] = list(runner.engine.warm_up_size())
        first = time.perf_counter()
        runner.call(engine.variant.min_inference_steps)
        row["first_request_after_warm_up_s"] = round(time.perf_counter() - first, 3)
    try:
        measured = runner.measure(runner.args.repeats)
        if OPTIONS[name] is not None:
            measured["masked_calls"] = runner.masked_calls()
    except Exception as err:  # noqa: BLE001 - e.g. a backend that refuses this shape or dtype
        measured = {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        if OPTIONS[name] is not None:
            pipe.transformer.set_attention_backend("native")
        elif name == "vae-channels-last":
            set_channels_last(pipe.vae, enabled=False)
    row.update(measured)
    if "error" not in measured:
        key = "vae_decode_s" if name == "vae-channels-last" else "transformer_forward_s"
        row["compared"] = key
        row["speedup"] = round(base[key] / measured[key], 3) if measured[key] else None
    return row


def planner_view(variant, gpu, mode: str, args, input_images: int) -> dict:
    from serve_app.domain.planner import estimate_seconds, estimate_vram

    vram = estimate_vram(variant, mode, args.size, args.size, input_images)
    view = {"planned_peak_gib": vram.peak_gib,
            "planned_allocated_gib": round(vram.peak_gib - vram.cuda_context_gib, 2)}  # what torch can see
    if gpu is not None and gpu.bf16_tflops:
        est = estimate_seconds(variant, gpu, mode, args.size, args.size, input_images, args.steps)
        view["forward_tflop"] = est.forward_tflop
        view["lower_bound_forward_s"] = round(est.forward_tflop / gpu.bf16_tflops, 4)  # 100% of peak
        view["planned_forward_s"] = round(est.denoise_s / est.forwards, 4)
        view["planned_total_s"] = est.total_s
    return view


def record_measurements(report: dict, args, gpu, folder: str):
    """Write this run's per-process peaks and step times in measurements.yaml's form, one file per run."""
    from datetime import datetime, timezone
    from pathlib import Path

    import yaml

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    source = f"bench/gpu_fullsize.py --record on {report['device']}, torch {report['torch']}, {stamp}"
    memory, timing = [], []
    for key, row in report["variants"].items():
        if "error" in row or "peak_process_gib" not in row:
            continue
        variant_id, mode = key.split("/")
        name = f"{variant_id}-{mode}-{gpu.id}-{args.size}-{stamp}"
        memory.append({"id": name, "scope": "pipeline", "quantity": "nvml", "variant": variant_id, "mode": mode,
                       "gpu": gpu.id, "width": args.size, "height": args.size,
                       "num_input_images": 1 if row.get("input_images") else 0, "gib": row["peak_process_gib"],
                       "source": source + " (reserved peak + memory outside the allocator)"})
        if mode == "none":
            per_step = row["denoise_s"] / args.steps
            timing.append({"id": name, "variant": variant_id, "gpu": gpu.id, "width": args.size, "height": args.size,
                           "num_inference_steps": args.steps, "seconds_per_step": round(per_step, 4),
                           "total_s": row["total_s"], "source": source})
    path = Path(folder) / f"gpu_fullsize-{gpu.id}-{stamp}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by `python -m bench.gpu_fullsize --record` ({source}).\n"
                    + yaml.safe_dump({"memory": memory, "timing": timing}, sort_keys=False))
    return path


def _parallel_rank(rank: int, address: str, results, args, variant_id: str, mode: str) -> None:
    """One rank of ``--parallel``: its own GPU (the only one it sees), the group, the model, timed calls."""
    if args.device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    import torch

    from serve_app.domain.catalog import default_catalog
    from serve_app.domain.parallelism import ParallelMode
    from serve_app.domain.specs import engine_spec
    from serve_app.engines.parallel import RankGroup, leave
    from serve_app.engines.random_weights import RandomWeightLoader

    if args.smoke:
        torch.set_num_threads(1)
    degree = ParallelMode.parse(mode).degree
    RankGroup(rank, degree, address, timeout_s=1800).join()
    catalog = default_catalog()
    spec = engine_spec(bench_config(args, variant_id, "none"), catalog.variant(variant_id), catalog, parallel=mode)
    try:
        runner = Runner(RandomWeightLoader(args.model_size)(spec), args)
        row = runner.measure(args.repeats)
    except Exception as err:  # noqa: BLE001 - e.g. does not fit: the result of this mode
        row = {"error": f"{type(err).__name__}: {err}"[:400]}
    if rank == 0:
        results.put(row)
    leave()


def parallel_rows(args, variant_id: str, gpu, one_gpu: dict | None) -> dict:
    """Every ``--parallel`` mode of one variant: measured on rank 0, beside the planner and the one-GPU row."""
    from serve_app.domain.catalog import default_catalog
    from serve_app.domain.parallelism import ParallelMode, plan_parallel_mode

    variant = default_catalog().variant(variant_id)
    rows = {}
    for mode in args.parallel:
        row = run_ranks(_parallel_rank, ParallelMode.parse(mode).degree, args, variant_id, mode)
        if gpu is not None:
            planned = plan_parallel_mode(variant, gpu, ParallelMode.parse(mode), args.size, args.size)
            row["planned_total_s"] = planned.seconds_per_image
            row["planned_peak_gib"] = planned.peak_vram_gib
        if one_gpu and "wall_s" in row and "wall_s" in one_gpu:
            row["speedup_over_one_gpu"] = round(one_gpu["wall_s"] / row["wall_s"], 3)
        rows[mode] = row
    return rows


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def through_service(args, variant, mode: str, direct_wall_s: float) -> dict:
    """One replica serving the same random-weight model; the handle path's wall time vs the direct call."""
    from ray import serve

    from serve_app.domain.images import encode_png
    from serve_app.domain.schemas import EditRequest, GenerateRequest
    from serve_app.engines.random_weights import RandomWeightLoader
    from serve_app.runner import LocalService, free_port

    config = bench_config(args, variant.id, mode)
    size = f"{args.size}x{args.size}"
    service = LocalService(config, port=free_port(), log_to_driver=False)
    try:
        service.start(loaders={variant.id: RandomWeightLoader(args.model_size)})
        handle = serve.get_app_handle(service.config.serving.app_name)
        if variant.tasks == ("generate",):
            def call():
                return handle.generate.remote(GenerateRequest(
                    prompt=PROMPT, model=variant.id, size=size, num_inference_steps=args.steps, seed=0)).result()
        else:
            from PIL import Image

            png = encode_png(Image.new("RGB", (args.size, args.size), (90, 120, 200)))

            def call():
                return handle.edit.remote(EditRequest(
                    prompt=EDIT_PROMPT, model=variant.id, images=[png], size=size, num_inference_steps=args.steps,
                    seed=0)).result()
        call()
        walls = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            call()
            walls.append(time.perf_counter() - started)
    finally:
        service.stop()
    handle_s = statistics.median(walls)
    return {"direct_wall_s": round(direct_wall_s, 4), "handle_wall_s": round(handle_s, 4),
            "ratio": round(handle_s / direct_wall_s, 3)}


def main() -> int:
    return run_reporting(parse_args(), run)


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--variants", type=csv, default=["z-image-turbo", "qwen-image-edit-2509"])
    parser.add_argument("--modes", type=csv, default=["none"], help="offload modes: none, model, sequential")
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--options", type=csv, default=["sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
                                                         "vae-channels-last", "compile"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parallel", type=csv, default=[],
                        help="multi-GPU modes to run beside one GPU (cp2, tp2, cp4, ...): one process per GPU")
    parser.add_argument("--no-service", action="store_true", help="skip the one-replica handle comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny dims on CPU: checks every code path quickly")
    parser.add_argument("--record", nargs="?", const=str(MEASURED_DIR), default=None,
                        help="write this run's peak memory and step times as planner measurements into a folder "
                             "(default serve_app/domain/measured/; then `imageserve calibrate --fit`)")
    args = parser.parse_args()
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; known: {', '.join(OPTIONS)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    return args


def run(args: argparse.Namespace, out) -> int:
    import torch

    from serve_app.domain.catalog import default_catalog
    from serve_app.domain.specs import engine_spec
    from serve_app.engines.hardware import detect_local_gpu
    from serve_app.engines.random_weights import RandomWeightLoader

    if args.smoke:
        args.device, args.model_size, args.size, args.steps, args.repeats = "cpu", "tiny", 64, 2, 1
        args.options = [o for o in args.options if o != "compile"] + ["sdpa-math"]
        torch.set_num_threads(1)
    else:
        args.device, args.model_size = "cuda", "full"
    catalog = default_catalog()
    local = detect_local_gpu(catalog.gpus.values()) if args.device == "cuda" else None
    gpu = local.gpu_class if local else None
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "gpu_class": gpu.id if gpu else None, "size": args.size, "steps": args.steps,
                    "model_size": args.model_size, "torch": torch.__version__, "variants": {}}
    for variant_id in args.variants:
        variant = catalog.variant(variant_id)
        input_images = 1 if "edit" in variant.tasks else 0
        for mode in args.modes:
            key = f"{variant_id}/{mode}"
            try:
                spec = engine_spec(bench_config(args, variant_id, mode), variant, catalog)
                engine = RandomWeightLoader(args.model_size)(spec)
            except Exception as err:  # noqa: BLE001 - e.g. does not fit this GPU in this mode: a result
                report["variants"][key] = {"error": f"{type(err).__name__}: {err}"[:400]}
                free_memory()
                continue
            runner = Runner(engine, args)
            row = {"build_s": round(engine.info.load_seconds, 2), "input_images": input_images,
                   **runner.measure(args.repeats),
                   **planner_view(variant, gpu, mode, args, input_images),
                   "masked_calls": runner.masked_calls(), "cancellation": runner.cancellation()}
            if mode == "none":
                row["swap"] = swap_round_trip(runner)
            row["options"] = {name: with_option(runner, name, row)
                              for name in sorted(args.options, key=lambda o: o == "compile")}
            report["variants"][key] = row
            del runner, engine
            free_memory()
            if not args.no_service and mode == args.modes[0]:
                row["service"] = through_service(args, variant, mode, row["wall_s"])
                free_memory()
        if args.parallel:
            report["variants"][f"{variant_id}/parallel"] = parallel_rows(
                args, variant_id, gpu, report["variants"].get(f"{variant_id}/none"))
    if args.record and gpu is not None:
        path = record_measurements(report, args, gpu, args.record)
        print(f"recorded the measurements in {path}: run `imageserve calibrate --fit`", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    print(f"{report['device']} ({report['gpu_class']}), {args.size}x{args.size}, {args.steps} steps, "
          f"{args.model_size} random weights, torch {report['torch']}")
    for key, row in report["variants"].items():
        if "error" in row:
            print(f"{key}: {row['error']}")
            continue
        if key.endswith("/parallel"):
            for mode, measured in row.items():
                print(f"{key} {mode}: {measured}")
            continue
        print(f"{key}: forward {row['transformer_forward_s']:.4f} s (planner {row.get('planned_forward_s', '-')}, "
              f"100%-peak bound {row.get('lower_bound_forward_s', '-')}), text {row.get('text_encode_s', 0):.3f} s, "
              f"VAE decode {row.get('vae_decode_s', 0):.3f} s, total {row['total_s']:.3f} s "
              f"(planner {row.get('planned_total_s', '-')}); peak VRAM {row.get('peak_vram_gib', '-')} GiB "
              f"(planner {row['planned_allocated_gib']} + context)")
        print(f"    masked calls: {row['masked_calls']}; cancellation: {row['cancellation']}")
        if "swap" in row:
            print(f"    swap: {row['swap']}")
        for name, option in row["options"].items():
            if "error" in option:
                print(f"    {name:<18} {option['error']}")
            else:
                print(f"    {name:<18} {option['compared']} x{option['speedup']} faster"
                      + (f" (compile {option['compile_s']} s)" if "compile_s" in option else ""))
        if "service" in row:
            s = row["service"]
            print(f"    service (1 replica, handle) {s['handle_wall_s']:.3f} s vs direct {s['direct_wall_s']:.3f} s:"
                  f" x{s['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
