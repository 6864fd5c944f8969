"""Autoscale reaction time: from a step in load to a new replica answering, and where it goes.

The embedded tiny Z-Image-Turbo deployment autoscales between 1 and 2 replicas (target 1 ongoing
request, metrics every 0.5 s over a 2 s window, upscale delay ``--upscale-delay``). After one warm
request, ``--clients`` HTTP clients start at once and keep sending; the script records when Serve
decided to add a replica (a second replica appears in ``serve.status()``), when it was RUNNING, and
when the first response came from it, all from the load step. Then the load stops and it records
when Serve scaled back to one replica (downscale delay ``--downscale-delay``).

    .venv/bin/python -m bench.autoscale [--clients 6] [--upscale-delay 1] [--downscale-delay 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from bench.common import bench_parser, run_reporting

DEPLOYMENT = "gen-z-image-turbo"


def replica_counts(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return {}
    return {str(state): count for state, count in status.deployments[DEPLOYMENT].replica_states.items()}


def main() -> int:
    return run_reporting(parse_args(), run)


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--upscale-delay", type=float, default=1.0, help="Serve's upscale_delay_s")
    parser.add_argument("--downscale-delay", type=float, default=5.0, help="Serve's downscale_delay_s")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    return parser.parse_args()


def run(args: argparse.Namespace, out) -> int:

    import httpx

    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.engines.random_weights import build_all
    from serve_app.runner import LocalService, free_port

    tiny_dir = Path(tempfile.mkdtemp(prefix="imageserve-bench-"))
    build_all(tiny_dir)
    data = embedded_config_data(tiny_dir)
    data["load"] = ["z-image-turbo"]
    data["models"]["z-image-turbo"]["deployment"] = {"autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": args.upscale_delay,
        "downscale_delay_s": args.downscale_delay, "metrics_interval_s": 0.5, "look_back_period_s": 2}}
    config = parse_config(data, "autoscale bench")
    app = config.serving.app_name
    body = {"prompt": "a lighthouse at dusk", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps}
    events: dict[str, float] = {}
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    with LocalService(config, port=free_port(), log_to_driver=False) as service, \
            httpx.Client(base_url=service.url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        first = client.post("/v1/images/generations", json={**body, "seed": 0})
        first.raise_for_status()
        original = first.json()["replica"]
        step = time.monotonic()

        def client_loop(k: int) -> None:
            i = 0
            while not stop.is_set():
                response = client.post("/v1/images/generations", json={**body, "seed": k * 10_000 + i})
                if response.status_code == 200:
                    answers.append((time.monotonic() - step, response.json()["replica"]))
                i += 1

        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(args.clients)]
        for thread in threads:
            thread.start()
        deadline = step + args.timeout
        while time.monotonic() < deadline and "new_replica_answered_s" not in events:
            counts = replica_counts(app)
            now = time.monotonic() - step
            if sum(counts.values()) >= 2:
                events.setdefault("second_replica_seen_s", now)
            if counts.get("RUNNING", 0) >= 2:
                events.setdefault("second_replica_running_s", now)
            new = [t for t, replica in list(answers) if replica != original]
            if new:
                events["new_replica_answered_s"] = min(new)
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        during = len(answers)
        load_end = time.monotonic()
        while time.monotonic() < load_end + args.timeout:
            if sum(replica_counts(app).values()) == 1 and replica_counts(app).get("RUNNING") == 1:
                events["back_to_one_replica_s"] = time.monotonic() - load_end
                break
            time.sleep(0.25)

    report = {
        "workload": (f"z-image-turbo tiny, {args.size}x{args.size}, {args.steps} steps, CPU, "
                     f"{args.clients} HTTP clients"),
        "autoscaling": data["models"]["z-image-turbo"]["deployment"]["autoscaling"],
        "from_load_step": {k: round(v, 2) for k, v in events.items() if k != "back_to_one_replica_s"},
        "from_load_end": {"back_to_one_replica_s": round(events["back_to_one_replica_s"], 2)}
        if "back_to_one_replica_s" in events else {},
        "answers_during_load": during,
    }
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0 if "new_replica_answered_s" in events else 1
    print(report["workload"])
    for label, value in {**report["from_load_step"], **report["from_load_end"]}.items():
        print(f"  {label:<28} {value:>7.2f} s")
    return 0 if "new_replica_answered_s" in events else 1


if __name__ == "__main__":
    sys.exit(main())
