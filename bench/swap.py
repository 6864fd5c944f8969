"""One GPU, two models: swaps per 100 requests and latency under mixed traffic.

Three ways to serve Z-Image-Turbo and Qwen-Image-Edit-2509 side by side, each fed the same open-loop mixed
traffic (seeded Poisson arrivals, a share of edits):

- ``turns``: one swap replica, the grouping policy with a turn of ``--max-wait`` (what imageserve does);
- ``fifo``: one swap replica that serves requests in arrival order (turn 0), swapping whenever the next
  request's model is not on the GPU: what a single-GPU server without grouping does;
- ``dedicated``: one replica per model, so two GPUs and no swaps: the bound on swaps, at twice the GPUs.

Two parts, each run side by side in one process:

1. ``tiny``: the real pipelines with tiny random-weight checkpoints on CPU (the swap path as served; a
   swap moves no bytes on CPU, so only the counts mean something);
2. ``rtx4090``: GPU timing doubles that take the planner's RTX 4090 seconds per image for the nunchaku
   4-bit variants (Z-Image-Turbo int4 resident, the edit model under model offload) and the planner's
   swap-in time for Z-Image's weights (11.5 GiB over PCIe 4.0 x16); all times scaled by ``--scale`` to
   keep the run short and reported in the card's seconds.

    .venv/bin/python -m bench.swap [--requests 200] [--edit-share 0.3] [--load 0.7] [--sweep 0,4,10,30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

# Replicas built in this process record into Ray's metrics; with auto-connect those would start a Ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, percentile, run_reporting
from deployments.model_replica import ModelReplica
from deployments.swap_replica import SwapReplica
from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import parse_config
from serve_app.domain.planner import estimate_seconds
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.domain.specs import resolve_application
from serve_app.domain.swapping import plan_swap_group
from serve_app.embedded import tiny_model_config
from serve_app.engines.gpu_doubles import gpu_timing_loader, photo_like_image
from serve_app.engines.random_weights import build_all

TINY = ("z-image-turbo", "qwen-image-edit-2509")
FOUR_BIT = ("z-image-turbo-svdq-int4-r128", "qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
SIDE = 64


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((photo_like_image(SIDE, SIDE) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(tiny_dir: Path, variants: tuple[str, str], swap_group: bool, max_wait_s: float):
    catalog = default_catalog()
    data: dict[str, Any] = {
        "device": {"device": "cpu"}, "hf": {"offline": True}, "defaults": {"width": SIDE, "height": SIDE},
        "serving": {"warmup": True, "torch_threads": 1},
        "models": {v: tiny_model_config(tiny_dir, catalog.variant(v)) for v in variants},
    }
    if swap_group:
        data["swap_groups"] = [{"name": "bench", "variants": list(variants), "max_wait_s": max_wait_s}]
    return resolve_application(parse_config(data, "bench.swap"))


class Arm:
    """One way of serving the two models, with what it needs to run a request and count swaps."""

    def __init__(self, name: str, tiny_dir: Path, variants: tuple[str, str], max_wait_s: float | None,
                 loaders: dict | None) -> None:
        self.name = name
        self.variants = variants
        if max_wait_s is None:
            spec = _config(tiny_dir, variants, swap_group=False, max_wait_s=0)
            self.replicas = {r.variant.id: ModelReplica(r, (loaders or {}).get(r.variant.id)) for r in spec.replicas}
            self.swap = None
        else:
            (group,) = _config(tiny_dir, variants, swap_group=True, max_wait_s=max_wait_s).swap_groups
            self.swap = SwapReplica(group, loaders)
            self.replicas = {}
        self.gpus = 2 if self.swap is None else 1

    @property
    def swaps(self) -> int:
        return 0 if self.swap is None else self.swap.arbiter.swaps

    async def run(self, variant: str, request):
        if self.swap is not None:
            return await self.swap.run(request, SIDE, SIDE, variant=variant)
        return await self.replicas[variant].run(request, SIDE, SIDE)

    def close(self) -> None:
        if self.swap is not None:
            self.swap.shutdown()
        for replica in self.replicas.values():
            replica.shutdown()


def traffic(requests: int, edit_share: float, rate_per_s: float, seed: int) -> list[tuple[float, bool]]:
    """(arrival second, is an edit) for each request: Poisson arrivals, independent task draws."""
    rng = random.Random(seed)
    now, out = 0.0, []
    for _ in range(requests):
        now += rng.expovariate(rate_per_s)
        out.append((now, rng.random() < edit_share))
    return out


async def drive(arm: Arm, schedule: list[tuple[float, bool]], png: bytes) -> dict[str, Any]:
    generate_id, edit_id = arm.variants
    latencies: list[float] = []
    by_task: dict[str, list[float]] = {"generate": [], "edit": []}
    swaps_before = arm.swaps

    async def one(at: float, is_edit: bool, start: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        if is_edit:
            await arm.run(edit_id, EditRequest(prompt="make it blue", images=[png], seed=1, num_inference_steps=2))
        else:
            await arm.run(generate_id, GenerateRequest(prompt="a red cube", seed=1, num_inference_steps=2))
        latencies.append(time.perf_counter() - sent)
        by_task["edit" if is_edit else "generate"].append(latencies[-1])

    start = time.perf_counter()
    await asyncio.gather(*(one(at, is_edit, start) for at, is_edit in schedule))
    elapsed = time.perf_counter() - start
    return {"swaps_per_100": 100 * (arm.swaps - swaps_before) / len(schedule),
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 95),
            **{f"p95_{task}_s": percentile(values, 95) for task, values in by_task.items() if values},
            "images_per_s_per_gpu": len(schedule) / elapsed / arm.gpus, "gpus": arm.gpus}


def run_part(name: str, tiny_dir: Path, variants: tuple[str, str], loaders: dict | None,
             arms: list[tuple[str, float | None]], schedule: list[tuple[float, bool]], scale: float) -> dict[str, Any]:
    """``arms``: (name, the swap replica's turn in seconds, or None for one replica per model)."""
    png = _png()
    rows = {}
    for arm_name, wait in arms:
        arm = Arm(arm_name, tiny_dir, variants, wait, loaders)
        try:
            result = asyncio.run(drive(arm, schedule, png))
        finally:
            arm.close()
        for key in [k for k in result if k.startswith("p") and k.endswith("_s")]:
            result[key] /= scale
        result["images_per_s_per_gpu"] *= scale
        rows[arm_name] = result
    return {"part": name, "arms": rows}


def three_arms(turn_s: float) -> list[tuple[str, float | None]]:
    return [("turns", turn_s), ("fifo", 0.0), ("dedicated", None)]


def measured_service_s(tiny_dir: Path) -> dict[str, float]:
    """Seconds per request of each tiny model alone on this machine (what part 1's arrival rate is set by)."""
    arm = Arm("probe", tiny_dir, TINY, None, None)
    png = _png()
    try:
        out = {}
        for variant, is_edit in zip(TINY, (False, True), strict=True):
            samples = []
            for _ in range(3):
                started = time.perf_counter()
                request = (EditRequest(prompt="x", images=[png], seed=1, num_inference_steps=2) if is_edit
                           else GenerateRequest(prompt="x", seed=1, num_inference_steps=2))
                asyncio.run(arm.run(variant, request))
                samples.append(time.perf_counter() - started)
            out[variant] = statistics.median(samples)
        return out
    finally:
        arm.close()


def run(args: argparse.Namespace, out: TextIO) -> int:
    tiny_dir = Path(tempfile.gettempdir()) / "imageserve-bench-tiny"
    build_all(tiny_dir)
    reports = []

    catalog = default_catalog()
    gpu = catalog.gpu("rtx-4090")
    modes = {FOUR_BIT[0]: "none", FOUR_BIT[1]: "model"}
    card_s = {v: estimate_seconds(catalog.variant(v), gpu, modes[v], 1024, 1024).total_s for v in FOUR_BIT}
    swap_in_s = {m.variant: m.swap_in_s for m in plan_swap_group([catalog.variant(v) for v in FOUR_BIT], gpu,
                                                                   None).members}
    mean_card_s = (1 - args.edit_share) * card_s[FOUR_BIT[0]] + args.edit_share * card_s[FOUR_BIT[1]]

    service = measured_service_s(tiny_dir)
    mean_s = (1 - args.edit_share) * service[TINY[0]] + args.edit_share * service[TINY[1]]
    schedule = traffic(args.requests, args.edit_share, args.load / mean_s, args.seed)
    # Part 1's turn holds as many mean requests as the card's turn does in part 2.
    reports.append(run_part("tiny", tiny_dir, TINY, None, three_arms(args.max_wait / mean_card_s * mean_s),
                            schedule, 1.0))

    loaders = {v: gpu_timing_loader(card_s[v] * args.scale, swap_in_s[v] * args.scale) for v in FOUR_BIT}
    schedule = [(at * args.scale, is_edit) for at, is_edit in
                traffic(args.requests, args.edit_share, args.load / mean_card_s, args.seed)]
    part = run_part("rtx4090", tiny_dir, FOUR_BIT, loaders, three_arms(args.max_wait * args.scale), schedule,
                    args.scale)
    part["card_seconds_per_image"] = card_s
    part["swap_in_s"] = swap_in_s
    reports.append(part)
    if args.sweep:
        turns = [float(t) for t in args.sweep.split(",")]
        reports.append(run_part("rtx4090, turn lengths", tiny_dir, FOUR_BIT, loaders,
                                [(f"turns {t:g} s", t * args.scale) for t in turns], schedule, args.scale))

    if args.json:
        print(json.dumps({"service_s_tiny": service, "parts": reports}), file=out)
        return 0
    print(f"{args.requests} requests, {args.edit_share:.0%} edits, offered load {args.load:.0%} of one GPU",
          file=out)
    for report in reports:
        print(f"\n{report['part']}:", file=out)
        print(f"  {'arm':<12} {'GPUs':>4} {'swaps/100 req':>14} {'p50 s':>8} {'p95 s':>8} {'p95 gen s':>10} "
              f"{'p95 edit s':>10} {'img/s/GPU':>10}", file=out)
        for arm, row in report["arms"].items():
            print(f"  {arm:<12} {row['gpus']:>4} {row['swaps_per_100']:>14.1f} {row['p50_s']:>8.2f} "
                  f"{row['p95_s']:>8.2f} {row.get('p95_generate_s', 0):>10.2f} {row.get('p95_edit_s', 0):>10.2f} "
                  f"{row['images_per_s_per_gpu']:>10.3f}", file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--edit-share", type=float, default=0.3, help="share of requests that are edits")
    parser.add_argument("--load", type=float, default=0.7, help="offered load as a share of one GPU's capacity")
    parser.add_argument("--max-wait", type=float, default=10.0, help="the policy's turn, in the card's seconds")
    parser.add_argument("--scale", type=float, default=0.02, help="part 2's time scale (card seconds x scale)")
    parser.add_argument("--sweep", help="comma-separated turn lengths (card seconds) for part 2, e.g. 0,4,10,30")
    parser.add_argument("--seed", type=int, default=0)
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    raise SystemExit(main())
