"""Throughput under concurrency through HTTP, with and without dynamic batching, side by side.

For each batching setting (``B`` or ``B@WAITms``: max_batch_size B, batch wait WAIT ms; 1 = off)
one private local Ray serves the tiny Z-Image-Turbo
checkpoint (the real ZImagePipeline, one replica, CPU); 1, 4 and 16 HTTP clients each send
``--requests`` same-shape requests. The script prints images/s and p50/p99 per (batch size,
clients), the mean images per pipeline call, and each batch size's ratios to batching off at
the same client count, with the verdict of the rule we keep batching by: on only where it raises
images/s by more than it raises p99.

    .venv/bin/python -m bench.throughput [--requests 48] [--clients 1,4,16] [--batching 1,8@0,8@10]
                                         [--size 128] [--steps 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, measure, run_reporting

PROMPTS = ["a lighthouse at dusk", "a red fox in fresh snow, morning light", "an old map of an island"]


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_setting(text: str) -> tuple[int, float]:
    """'8@10' -> (8, 0.010): max_batch_size and batch wait in seconds (10 ms when not given)."""
    batch, _, wait_ms = text.partition("@")
    return int(batch), float(wait_ms or 10) / 1000


def run_setting(tiny_dir: Path, setting: str, args: argparse.Namespace) -> dict[str, dict]:
    import httpx

    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.runner import LocalService, free_port

    data = embedded_config_data(tiny_dir)
    data["load"] = ["z-image-turbo"]
    batch, wait_s = parse_setting(setting)
    data["models"]["z-image-turbo"].update(max_batch_size=batch, batch_wait_timeout_s=wait_s)
    config = parse_config(data, f"throughput bench, batching {setting}")
    rows: dict[str, dict] = {}
    with LocalService(config, port=free_port(), log_to_driver=False) as service, \
            httpx.Client(base_url=service.url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        def post(i: int) -> int:
            response = client.post("/v1/images/generations", json={
                "prompt": PROMPTS[i % len(PROMPTS)], "size": f"{args.size}x{args.size}",
                "num_inference_steps": args.steps, "seed": max(i, 0)})
            response.raise_for_status()
            body = response.json()
            return body["batch_images"] if len(body["data"]) == 1 else 0

        for clients in args.clients:
            row = measure(post, args.requests, clients)
            batches = row.pop("outcomes")
            row["images_per_s"] = row.pop("requests_per_s")  # one image per request
            row["mean_batch_images"] = round(sum(batches) / len(batches), 2)
            rows[str(clients)] = row
    return rows


def compare(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Each batching setting against batching off at the same client count, and the keep-it verdict."""
    base = results["1"]
    out: dict[str, dict[str, dict]] = {}
    for batch, rows in results.items():
        if batch == "1":
            continue
        out[batch] = {}
        for clients, row in rows.items():
            gain = row["images_per_s"] / base[clients]["images_per_s"]
            p99_cost = row["p99_ms"] / base[clients]["p99_ms"]
            out[batch][clients] = {"images_per_s_x": round(gain, 2), "p99_x": round(p99_cost, 2),
                                   "p50_x": round(row["p50_ms"] / base[clients]["p50_ms"], 2),
                                   "keep": gain > 1.0 and p99_cost <= gain}
    return out


def main() -> int:
    return run_reporting(parse_args(), run)


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=48, help="requests per (batch size, clients)")
    parser.add_argument("--clients", type=ints, default=[1, 4, 16], help="comma-separated client counts")
    parser.add_argument("--batching", type=lambda t: t.split(","), default=["1", "8@0", "8@10"],
                        help="settings B or B@WAITms, comma-separated; 1 = off (always measured)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    return parser.parse_args()


def run(args: argparse.Namespace, out) -> int:
    if "1" not in args.batching:
        args.batching = ["1", *args.batching]

    from serve_app.engines.random_weights import build_all

    tiny_dir = Path(tempfile.mkdtemp(prefix="imageserve-bench-"))
    build_all(tiny_dir)
    results = {setting: run_setting(tiny_dir, setting, args) for setting in args.batching}
    report = {"workload": f"z-image-turbo tiny, {args.size}x{args.size}, {args.steps} steps, 1 replica, CPU, HTTP",
              "results": results, "vs_batching_off": compare(results)}
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    print(report["workload"])
    print(f"{'batch':>6} {'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'img/call':>8}"
          f" {'img/s x':>8} {'p99 x':>6} keep")
    for batch, rows in results.items():
        for clients, row in rows.items():
            vs = report["vs_batching_off"].get(batch, {}).get(clients)
            extra = f" {vs['images_per_s_x']:>8.2f} {vs['p99_x']:>6.2f} {'yes' if vs['keep'] else 'no'}" if vs else ""
            print(f"{batch:>6} {clients:>7} {row['images_per_s']:>7.2f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}"
                  f" {row['mean_batch_images']:>8.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
