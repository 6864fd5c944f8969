"""Soak: mixed traffic for a bounded time, and whether any process's resources grow without bound.

The embedded default (tiny Z-Image-Turbo and Qwen-Image-Edit on CPU, in a private Ray cluster) takes traffic
from ``--clients`` threads for ``--duration`` seconds. Each client cycles through a mix:

- a generation, with and without a per-request LoRA;
- an edit;
- a streamed generation with previews;
- a request refused for bad input (422);
- a request whose client gives up mid-denoising (a cancellation).

Every ``--interval`` seconds it samples each process of the cluster: the Serve replicas (router, each model),
the HTTP proxy, the Serve controller, the raylet and the GCS. They are found as the cluster's own process tree
(the head's processes and their children), never by name across the machine. For each it records RSS, open
file descriptors and threads, and it records the Ray object store's use.

A series *grows without bound* when, after the warm-up (the first quarter of the run), its least-squares slope
would add more than the tolerance over the run's length: 10% of its level and 64 MB for RSS, 16 descriptors,
8 threads, 64 MB of object store. The run fails (exit 1) when any series grows so. The table shows each series
at four points of the run.

    .venv/bin/python -m bench.soak [--duration 600] [--clients 3] [--interval 5] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, run_reporting

MB = 1024 * 1024
# Per kind of series: (absolute allowance over the run, allowance as a share of the series' level).
TOLERANCE = {"rss_mb": (64.0, 0.10), "fds": (16.0, 0.0), "threads": (8.0, 0.0), "object_store_mb": (64.0, 0.0)}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def cluster_processes(known: dict[int, str]) -> dict[int, str]:
    """pid -> role of every process of this driver's Ray cluster: the head's GCS and raylet (from the node Ray
    started here) and the raylet's children (workers, named by the title Ray gives them). A pid in ``known``
    keeps its role: a worker's title changes with the task it runs."""
    import psutil
    import ray._private.worker as ray_worker
    from ray._private import ray_constants

    node = ray_worker._global_node
    roles = dict(known)
    for kind, role in ((ray_constants.PROCESS_TYPE_GCS_SERVER, "gcs"), (ray_constants.PROCESS_TYPE_RAYLET, "raylet")):
        for info in node.all_processes.get(kind, []):
            roles[info.process.pid] = role
    raylets = [pid for pid, role in roles.items() if role == "raylet"]
    for raylet in raylets:
        for child in psutil.Process(raylet).children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and child.pid not in roles:
                roles[child.pid] = actor_role(title.split()[0].removeprefix("ray::"))
    return roles


def actor_role(title: str) -> str:
    """A worker's role from the title Ray gives it, without the method it runs now: 'ServeReplica:imageserve:router',
    'ProxyActor', 'ServeController', 'IDLE' (a pooled worker)."""
    if title.startswith("ServeReplica:"):
        app_and_deployment, _, name = title.rpartition(":")
        return f"{app_and_deployment}:{name.split('.')[0]}"
    return title.split(".")[0]


def sample(roles: dict[int, str]) -> dict[str, dict[str, float]]:
    """role -> its RSS (MB), open descriptors and threads now (roles that share a title are summed)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for pid, role in roles.items():
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                values = {"rss_mb": process.memory_info().rss / MB, "fds": process.num_fds(),
                          "threads": process.num_threads()}
        except psutil.Error:
            continue  # a replaced process; its successor is picked up at the next discovery
        entry = out.setdefault(role, {"rss_mb": 0.0, "fds": 0, "threads": 0})
        for key, value in values.items():
            entry[key] += value
    return out


def object_store_mb() -> float:
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    free = ray.available_resources().get("object_store_memory", total)
    return (total - free) / MB


def slope(times: list[float], values: list[float]) -> float:
    """Least-squares slope of values over times."""
    n = len(times)
    mean_t, mean_v = sum(times) / n, sum(values) / n
    spread = sum((t - mean_t) ** 2 for t in times)
    return 0.0 if spread == 0 else sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread


def growth(samples: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Every series' growth over the run after the warm-up, and whether it is past its tolerance."""
    steady = [s for s in samples if s["t"] >= duration / 4]
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for s in steady:
        for role, values in s["processes"].items():
            for kind, value in values.items():
                series.setdefault((role, kind), []).append((s["t"], value))
        series.setdefault(("ray", "object_store_mb"), []).append((s["t"], s["object_store_mb"]))
    rows = []
    for (role, kind), points in sorted(series.items()):
        if len(points) < 3:
            continue
        times, values = [p[0] for p in points], [p[1] for p in points]
        level = sum(values) / len(values)
        over_run = slope(times, values) * duration
        absolute, share = TOLERANCE[kind]
        allowed = absolute + share * level
        rows.append({"process": role, "series": kind, "level": level, "growth_over_run": over_run,
                     "allowed": allowed, "unbounded": over_run > allowed})
    return rows


class Mix:
    """The clients' request mix, and the count of each outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.png = _png()
        self.outcomes: Counter = Counter()
        self.lock = threading.Lock()

    def one(self, client, i: int) -> str:
        import httpx

        kind = ("generate", "generate_lora", "edit", "stream", "bad_input", "cancel")[i % 6]
        body = {"prompt": f"a lighthouse {i}", "size": "64x64", "num_inference_steps": 2, "seed": i}
        try:
            if kind == "generate":
                status = client.post("/v1/images/generations", json=body).status_code
            elif kind == "generate_lora":
                status = client.post("/v1/images/generations",
                                     json={**body, "lora": {"name": "tiny-style", "scale": 0.5}}).status_code
            elif kind == "edit":
                status = client.post("/v1/images/edits", files=[("image", ("a.png", self.png, "image/png"))],
                                     data={"prompt": "make it blue", "size": "64x64",
                                           "num_inference_steps": "2"}).status_code
            elif kind == "stream":
                with client.stream("POST", "/v1/images/generations",
                                   json={**body, "stream": True, "partial_images": 1}) as response:
                    for _ in response.iter_lines():
                        pass
                    status = response.status_code
            elif kind == "bad_input":
                status = client.post("/v1/images/generations", json={**body, "size": "63x64"}).status_code
            else:  # leaves before the answer: the denoising of 100 steps is cancelled
                try:
                    client.post("/v1/images/generations", json={**body, "num_inference_steps": 100,
                                                                "size": "256x256"}, timeout=0.3)
                    status = "finished"
                except httpx.TimeoutException:
                    status = "left"
        except httpx.HTTPError as err:
            status = type(err).__name__
        outcome = f"{kind}:{status}"
        with self.lock:
            self.outcomes[outcome] += 1
        return outcome


def run(args: argparse.Namespace, out: TextIO) -> int:
    import httpx

    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.engines.random_weights import build_all
    from serve_app.runner import LocalService, free_port

    tiny_dir = Path(tempfile.gettempdir()) / "imageserve-bench-tiny"
    build_all(tiny_dir)
    config = parse_config(embedded_config_data(tiny_dir), "soak")
    samples: list[dict[str, Any]] = []
    with LocalService(config, port=free_port(), log_to_driver=False) as service:
        mix = Mix(service.url)
        stop = threading.Event()

        def client(offset: int) -> None:
            with httpx.Client(base_url=service.url, timeout=120) as http:
                i = offset
                while not stop.is_set():
                    mix.one(http, i)
                    i += args.clients

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        roles: dict[int, str] = {}
        while (elapsed := time.monotonic() - started) < args.duration:
            roles = cluster_processes(roles)
            samples.append({"t": elapsed, "processes": sample(roles), "object_store_mb": object_store_mb()})
            time.sleep(min(args.interval, max(args.duration - elapsed, 0)))
        stop.set()
        for thread in threads:
            thread.join(180)
    rows = growth(samples, args.duration)
    unbounded = [r for r in rows if r["unbounded"]]
    result = {"duration_s": args.duration, "clients": args.clients, "outcomes": dict(mix.outcomes),
              "samples": samples, "growth": rows, "unbounded": unbounded}
    if args.json:
        print(json.dumps(result), file=out)
        return 1 if unbounded else 0
    print(f"soak: {args.duration:.0f} s, {args.clients} clients, {sum(mix.outcomes.values())} requests", file=out)
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(mix.outcomes.items())), file=out)
    points = [samples[round(q * (len(samples) - 1))] for q in (0.25, 0.5, 0.75, 1.0)] if samples else []
    print(f"\n{'process':<52} {'series':<15} " + " ".join(f"{p['t']:>8.0f}s" for p in points)
          + f" {'growth':>9} {'allowed':>8}", file=out)
    for row in rows:
        values = [(p["object_store_mb"] if row["process"] == "ray" else
                   p["processes"].get(row["process"], {}).get(row["series"], float("nan"))) for p in points]
        print(f"{row['process'][:52]:<52} {row['series']:<15} " + " ".join(f"{v:>9.1f}" for v in values)
              + f" {row['growth_over_run']:>9.1f} {row['allowed']:>8.1f}{'  UNBOUNDED' if row['unbounded'] else ''}",
              file=out)
    print(f"\n{'FAIL' if unbounded else 'ok'}: {len(unbounded)} series grow past their tolerance", file=out)
    return 1 if unbounded else 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (10 minutes)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    raise SystemExit(main())
