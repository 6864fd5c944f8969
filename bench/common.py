"""What the benchmarks share: percentiles, driving a callable with N concurrent clients, and comparing images."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

# One JSON object on stdout with --json, whatever Ray prints: the CLI's own (imageserve cluster-sim --json).
from serve_app.cli import report_stream


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser, described by its module docstring's first line, with --json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def run_reporting(args: argparse.Namespace, run: Callable[[argparse.Namespace, TextIO], int]) -> int:
    """Call ``run(args, out)`` with ``out`` the stream its report goes to (stdout alone under --json)."""
    with report_stream(args.json) as out:
        return run(args, out)


def run_ranks(target: Callable[..., None], degree: int, *args: Any, timeout_s: float = 3600) -> Any:
    """``target(rank, address, results, *args)`` in ``degree`` spawned processes that join one process group at
    ``address``; what rank 0 puts on ``results``."""
    import torch.multiprocessing as mp

    from serve_app.runner import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    processes = [context.Process(target=target, args=(rank, address, results, *args)) for rank in range(degree)]
    for process in processes:
        process.start()
    answer = results.get(timeout=timeout_s)
    for process in processes:
        process.join(120)
    return answer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(call: Callable[[int], Any], requests: int, concurrency: int, warm_up: bool = True) -> dict[str, Any]:
    """Run ``call(i)`` for i in range(requests) from ``concurrency`` client threads.

    Returns p50/p99 latency in ms, requests/s over the wall time, and ``outcomes``: what each call
    returned, in completion order (for figures the caller derives, e.g. images per batch).
    """
    if warm_up:
        call(-1)  # one untimed call: connection set-up, first-call caches
    latencies: list[float] = []
    outcomes: list[Any] = []

    def timed(i: int) -> None:
        start = time.perf_counter()
        outcome = call(i)
        latencies.append((time.perf_counter() - start) * 1000)
        outcomes.append(outcome)

    wall = time.perf_counter()
    if concurrency == 1:
        for i in range(requests):
            timed(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(timed, range(requests)))
    wall = time.perf_counter() - wall
    return {"p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(percentile(latencies, 99), 2),
            "requests_per_s": round(requests / wall, 2), "requests": requests, "wall_s": round(wall, 2),
            "outcomes": outcomes}


def photo_png(side: int = 96) -> bytes:
    """A photo-like test image (smooth gradients and edges, ``gpu_doubles.photo_like_image``) as PNG bytes: the
    input of the edit benchmarks."""
    import io

    from PIL import Image

    from serve_app.engines.gpu_doubles import photo_like_image

    buffer = io.BytesIO()
    Image.fromarray((photo_like_image(side, side) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_difference(image, reference) -> dict[str, float]:
    """How far ``image`` is from ``reference`` (arrays in [0, 1], as the engines return them), in 8-bit pixel
    values: mean and largest absolute difference, and PSNR in dB (inf when equal)."""
    import math

    import numpy as np

    diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) * 255
    mse = float(np.mean(diff ** 2))
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)}
