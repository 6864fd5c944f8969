"""Context parallel on CPU: seconds per image of one process against two ranks (Ulysses over gloo), side by side.

The tiny Z-Image pipeline (random weights, the real classes) at a size where attention dominates its tiny
transformer, run through the serving engine three ways on this machine's cores:

* one process, one thread;
* one process, as many threads as ranks below: the strongest fair baseline (the same cores, no exchange);
* ``cp2``: two processes of one thread each, joined over gloo, each with half the sequence
  (``serve_app.engines.parallel``), as a multi-GPU replica runs its ranks.

It shows the path working and what the all-to-all costs against the compute it splits on two CPU cores; it says
nothing about GPUs, where the split runs over NVLink or PCIe (``bench/gpu_fullsize.py --parallel``).

    .venv/bin/python -m bench.parallel [--size 1024] [--steps 4] [--images 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TextIO

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.common import bench_parser, run_ranks, run_reporting
from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import parse_config
from serve_app.domain.schemas import GenerateRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines.random_weights import build_all

VARIANT = "z-image-turbo"
RANKS = 2


def _engine(tiny_dir: Path, parallel: str | None):
    from serve_app.engines import load_engine

    catalog = default_catalog()
    model = {**tiny_model_config(tiny_dir, catalog.variant(VARIANT)), "parallel": parallel}
    config = parse_config({"device": {"device": "cpu"}, "hf": {"offline": True}, "models": {VARIANT: model}})
    return load_engine(engine_spec(config, catalog.variant(VARIANT), catalog, parallel=parallel))


def _timed_calls(engine, size: int, steps: int, images: int) -> tuple[list[float], list[float], np.ndarray]:
    """Seconds per call and denoising seconds per call, after one warm-up call; and the last image."""
    from serve_app.engines.protocol import Job

    request = GenerateRequest(model=VARIANT, prompt="a lighthouse on a cliff at dusk", seed=7,
                              num_inference_steps=steps, size=f"{size}x{size}")
    totals, denoise = [], []
    for index in range(images + 1):
        started = time.perf_counter()
        (result,) = engine.run([Job(request, size, size, steps)], should_stop=lambda: False)
        if index:  # the first call warms up
            totals.append(time.perf_counter() - started)
            denoise.append(result.timings["denoise_s"])
    return totals, denoise, np.asarray(result.images[0], dtype=np.float64)


def one_process(tiny_dir: Path, threads: int, size: int, steps: int, images: int):
    import torch

    torch.set_num_threads(threads)
    return _timed_calls(_engine(tiny_dir, None), size, steps, images)


def _rank(rank: int, address: str, results, tiny_dir: Path, size: int, steps: int, images: int) -> None:
    import torch

    from serve_app.engines.parallel import RankGroup, leave

    torch.set_num_threads(1)
    RankGroup(rank, RANKS, address, timeout_s=600).join()
    measured = _timed_calls(_engine(tiny_dir, f"cp{RANKS}"), size, steps, images)
    if rank == 0:
        results.put(measured)
    leave()


def ranks(tiny_dir: Path, size: int, steps: int, images: int):
    return run_ranks(_rank, RANKS, tiny_dir, size, steps, images, timeout_s=1800)


def run(args: argparse.Namespace, out: TextIO) -> int:
    tiny_dir = Path(tempfile.gettempdir()) / "imageserve-bench-tiny"
    build_all(tiny_dir)
    rows, reference = {}, None
    for name, measure in (("1 process, 1 thread", lambda: one_process(tiny_dir, 1, args.size, args.steps, args.images)),
                          (f"1 process, {RANKS} threads",
                           lambda: one_process(tiny_dir, RANKS, args.size, args.steps, args.images)),
                          (f"cp{RANKS}: {RANKS} processes x 1 thread",
                           lambda: ranks(tiny_dir, args.size, args.steps, args.images))):
        totals, denoise, image = measure()
        reference = image if reference is None else reference
        rows[name] = {"seconds_per_image": statistics.median(totals), "denoise_s": statistics.median(denoise),
                      "max_abs_diff_vs_first": float(np.abs(image - reference).max())}
    baseline = rows[f"1 process, {RANKS} threads"]
    for row in rows.values():
        row["vs_strongest_baseline"] = row["seconds_per_image"] / baseline["seconds_per_image"]
        row["denoise_vs_strongest_baseline"] = row["denoise_s"] / baseline["denoise_s"]
    report = {"variant": VARIANT, "size": args.size, "steps": args.steps, "images": args.images,
              "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(report), file=out)
        return 0
    print(f"{VARIANT} (tiny), {args.size}x{args.size}, {args.steps} steps, median of {args.images} images, "
          f"{os.cpu_count()} CPUs", file=out)
    print(f"  {'how':<32} {'s/image':>8} {'denoise s':>10} {'x baseline':>11} {'denoise x':>10} {'max |d|':>9}",
          file=out)
    for name, row in rows.items():
        print(f"  {name:<32} {row['seconds_per_image']:>8.3f} {row['denoise_s']:>10.3f} "
              f"{row['vs_strongest_baseline']:>11.2f} {row['denoise_vs_strongest_baseline']:>10.2f} "
              f"{row['max_abs_diff_vs_first']:>9.1e}", file=out)
    print(f"  (x baseline: seconds over '1 process, {RANKS} threads', lower is faster)", file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=3, help="timed calls per way (after one warm-up)")
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    raise SystemExit(main())
