"""The serving path around a GPU: images/s against the GPU's limit, and the latency it adds, per output format.

One replica serves a TEST DOUBLE for the GPU (``serve_app.engines.gpu_doubles.GpuTimingDouble``): its
pipeline call sleeps ``T`` seconds per image without the GIL, as a thread waiting on CUDA kernels does,
and returns a photo-like 1024x1024 image, the same every run. So the GPU's limit is exactly ``1/T``
images/s and everything else measured is the serving path: queueing, conversion, encoding, base64, HTTP.

Two applications run side by side in one Ray, on the same double:

* ``pool``: imageserve's path: its own PNG writer, in the replica's encoder pool while the GPU's thread
  runs on;
* ``inline``: the path before it: Pillow's PNG with its defaults, on the GPU's thread after each call
  (``encode_workers: 0``, ``png_writer: pillow``). JPEG goes through Pillow on both.

Each is driven through HTTP and through a Python handle at 1, 4 and 16 clients, for PNG and JPEG, at
``T`` = 1.0 and 0.25 s. Printed per cell: images/s, its fraction of the limit, and the p50 and p95 latency
added over ``T``.

    .venv/bin/python -m bench.hot_path [--seconds-per-image 1.0,0.25] [--clients 1,4,16] [--formats png,jpeg]
                                       [--size 1024] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, percentile, run_reporting

# encode_workers and png_writer of each side: imageserve's path, and the path before it.
PATHS = {"pool": (2, "imageserve"), "inline": (0, "pillow")}


def floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def app_config(tiny_dir: Path, name: str, size: int):
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data

    data = embedded_config_data(tiny_dir)
    data["models"] = {"z-image-turbo": {**data["models"]["z-image-turbo"], "max_batch_size": 1}}
    data["defaults"] = {"width": size, "height": size}
    data["serving"].update({
        "app_name": name, "encode_workers": PATHS[name][0], "png_writer": PATHS[name][1], "warmup": False,
        "limits": {"max_request_cost": None},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 512, "num_cpus": 0},
    })
    return parse_config(data, f"hot path bench ({name})")


def drive(call, requests: int, clients: int) -> tuple[float, list[float]]:
    """(wall seconds, each request's seconds) for ``requests`` calls from ``clients`` threads."""
    def timed(i: int) -> float:
        started = time.perf_counter()
        call(i)
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(timed, range(requests)))
    return time.perf_counter() - started, latencies


def cell(call, seconds_per_image: float, clients: int, rounds: int) -> dict:
    call(-1)  # one request first: connections, the handle's first resolution
    requests = max(8, rounds * clients)
    wall, latencies = drive(call, requests, clients)
    images_per_s = requests / wall
    return {
        "requests": requests,
        "images_per_s": round(images_per_s, 3),
        "of_gpu_limit": round(images_per_s * seconds_per_image, 3),
        "added_p50_ms": round(1000 * (percentile(latencies, 50) - seconds_per_image), 1),
        "added_p95_ms": round(1000 * (percentile(latencies, 95) - seconds_per_image), 1),
    }


def run_t(tiny_dir: Path, seconds_per_image: float, args: argparse.Namespace) -> dict:
    import httpx
    from ray import serve

    from serve_app.domain.schemas import GenerateRequest
    from serve_app.engines.gpu_doubles import gpu_timing_loader
    from serve_app.runner import LocalService, free_port

    loaders = {"z-image-turbo": gpu_timing_loader(seconds_per_image)}
    size = f"{args.size}x{args.size}"
    results: dict = {}
    service = LocalService(app_config(tiny_dir, "pool", args.size), port=free_port(), log_to_driver=False)
    service.start(loaders=loaders)
    try:
        service.add_application(app_config(tiny_dir, "inline", args.size), "/inline", loaders)
        with httpx.Client(base_url=service.url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            for path in PATHS:
                prefix = "" if path == "pool" else "/inline"
                handle = serve.get_app_handle(path)
                for fmt in args.formats:
                    body = {"prompt": "a lighthouse at dusk", "size": size, "output_format": fmt}

                    def over_http(_: int, prefix=prefix, body=body) -> None:
                        response = client.post(f"{prefix}/v1/images/generations", json=body)
                        response.raise_for_status()

                    def over_handle(_: int, handle=handle, fmt=fmt) -> None:
                        handle.generate.remote(GenerateRequest(prompt="a lighthouse at dusk", size=size,
                                                               output_format=fmt)).result()

                    for transport, call in (("http", over_http), ("handle", over_handle)):
                        for clients in args.clients:
                            key = f"{path}/{fmt}/{transport}/{clients}"
                            results[key] = cell(call, seconds_per_image, clients, args.rounds)
                            print(f"  T={seconds_per_image}s {key}: {results[key]}", file=sys.stderr)
    finally:
        service.stop()
    return results


def ratios(results: dict) -> dict:
    """pool over inline for each (format, transport, clients): images/s and added p50."""
    out = {}
    for key, row in results.items():
        path, rest = key.split("/", 1)
        if path != "pool" or f"inline/{rest}" not in results:
            continue
        old = results[f"inline/{rest}"]
        out[rest] = {"images_per_s_x": round(row["images_per_s"] / old["images_per_s"], 2),
                     "added_p50_ms": (row["added_p50_ms"], old["added_p50_ms"])}
    return out


def run(args: argparse.Namespace, out) -> int:
    from serve_app.engines.random_weights import build_all

    tiny_dir = Path(tempfile.mkdtemp(prefix="imageserve-hot-path-"))
    build_all(tiny_dir)  # the config names a source; the double loads nothing from it
    report: dict = {"size": args.size, "cpus": os.cpu_count(), "runs": {}}
    for seconds_per_image in args.seconds_per_image:
        results = run_t(tiny_dir, seconds_per_image, args)
        report["runs"][str(seconds_per_image)] = {"results": results, "pool_vs_inline": ratios(results)}
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    for t, run_report in report["runs"].items():
        print(f"\nT = {t} s per image (GPU limit {1 / float(t):.2f} images/s), {args.size}x{args.size}, "
              f"one replica, {report['cpus']} CPUs", file=out)
        print(f"{'format/transport/clients':<24} {'pool img/s':>10} {'of limit':>9} {'+p50 ms':>8} {'+p95 ms':>8}"
              f" | {'inline img/s':>12} {'of limit':>9} {'+p50 ms':>8} | {'x img/s':>7}", file=out)
        for rest, ratio in run_report["pool_vs_inline"].items():
            new, old = run_report["results"][f"pool/{rest}"], run_report["results"][f"inline/{rest}"]
            print(f"{rest:<24} {new['images_per_s']:>10.3f} {new['of_gpu_limit']:>9.3f} {new['added_p50_ms']:>8.0f}"
                  f" {new['added_p95_ms']:>8.0f} | {old['images_per_s']:>12.3f} {old['of_gpu_limit']:>9.3f}"
                  f" {old['added_p50_ms']:>8.0f} | {ratio['images_per_s_x']:>7.2f}", file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds-per-image", type=floats, default=[1.0, 0.25],
                        help="simulated GPU seconds per image (T), comma-separated")
    parser.add_argument("--clients", type=ints, default=[1, 4, 16])
    parser.add_argument("--formats", type=lambda t: t.split(","), default=["png", "jpeg"])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client in each cell")
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
