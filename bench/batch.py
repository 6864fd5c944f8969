"""Interactive latency with a batch filling the idle GPU time, against the same traffic with no batch, in one run.

One replica of Z-Image-Turbo on the GPU timing double (``GpuTimingDouble``: ``T`` seconds of simulated GPU time
per image, spread over its denoising steps, with the GIL released as a thread waiting on CUDA does). Interactive
requests arrive open-loop (Poisson, at ``--load`` of the replica's capacity 1/T) over HTTP; the same arrival times
are replayed twice: first alone, then while a batch of ``--lines`` generation lines (uploaded through
``/v1/files`` and ``/v1/batches``) runs at background priority. The report gives each pass's p50 and p95 and
their ratios (goal: within 1.15x), the batch lines done during the second pass, how long the batch took to
complete, and how often a line yielded to an interactive request. A third pass replays the arrivals beside the
baseline a Batch API replaces: a client script sending the same lines through the interactive route, as many at
once as the batch runner keeps in flight.

    .venv/bin/python -m bench.batch [--seconds-per-image 0.25] [--load 0.5] [--requests 120] [--lines 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import bench_parser, percentile, run_reporting

SIZE = 256
STEPS = 8
LINES_IN_FLIGHT = 2  # serving.batch.lines_in_flight's default


def app_config(tiny_dir: Path, state_dir: str):
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data

    data = embedded_config_data(tiny_dir)
    data["models"] = {"z-image-turbo": {**data["models"]["z-image-turbo"], "max_batch_size": 1}}
    data["serving"].update({
        "warmup": False, "limits": {"max_request_cost": None},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 512, "num_cpus": 0},
        "batch": {"state_dir": state_dir, "poll_interval_s": 0.2},
    })
    return parse_config(data, "batch bench")


def arrivals(rate: float, requests: int, seed: int) -> list[float]:
    """Open-loop arrival offsets (seconds from the start), Poisson at ``rate`` per second."""
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(requests):
        now += rng.expovariate(rate)
        times.append(now)
    return times


def interactive_pass(client, times: list[float]) -> list[float]:
    """Each request's seconds from its send to its answer, sent at ``times`` (open loop)."""
    body = {"prompt": "a lighthouse at dusk", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS}
    latencies: list[float] = [0.0] * len(times)
    start = time.monotonic() + 0.5

    def send(i: int) -> None:
        time.sleep(max(0.0, start + times[i] - time.monotonic()))
        sent = time.monotonic()
        answer = client.post("/v1/images/generations", json=body)
        answer.raise_for_status()
        latencies[i] = time.monotonic() - sent

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(send, range(len(times))))
    return latencies


def client_script(client, lines: int, concurrency: int,
                  stop: threading.Event) -> tuple[list[int], list[threading.Thread]]:
    """The baseline without a Batch API: a script pushing the same lines through the interactive route, with as
    many in flight as the batch runner keeps (``lines_in_flight``): the lines it finished (filled in as it goes)
    and its threads, which end when ``stop`` is set."""
    done: list[int] = []
    queue = iter(range(lines))
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                i = next(queue, None)
            if i is None:
                return
            client.post("/v1/images/generations", json={"prompt": f"catalogue item {i}", "size": f"{SIZE}x{SIZE}",
                                                        "num_inference_steps": STEPS, "seed": i}).raise_for_status()
            done.append(i)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    return done, threads


def submit_batch(client, lines: int) -> str:
    text = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {"prompt": f"catalogue item {i}", "size": f"{SIZE}x{SIZE}",
                                        "num_inference_steps": STEPS, "seed": i}}) + "\n" for i in range(lines))
    file = client.post("/v1/files", files={"file": ("lines.jsonl", text.encode())}, data={"purpose": "batch"})
    file.raise_for_status()
    batch = client.post("/v1/batches", json={"input_file_id": file.json()["id"],
                                             "endpoint": "/v1/images/generations", "completion_window": "24h"})
    batch.raise_for_status()
    return batch.json()["id"]


def batch_state(client, batch_id: str) -> dict:
    return client.get(f"/v1/batches/{batch_id}").json()


def summary(latencies: list[float]) -> dict:
    return {"p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1)}


def run(args: argparse.Namespace, out) -> int:
    import httpx
    from ray import serve

    from serve_app.engines.gpu_doubles import gpu_timing_loader
    from serve_app.engines.random_weights import build_all
    from serve_app.runner import LocalService, free_port

    tiny_dir = Path(tempfile.mkdtemp(prefix="imageserve-batch-bench-"))
    build_all(tiny_dir)  # the config names a source; the double loads nothing from it
    times = arrivals(args.load / args.seconds_per_image, args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as state_dir:
        service = LocalService(app_config(tiny_dir, state_dir), port=free_port(), log_to_driver=False)
        service.start(loaders={"z-image-turbo": gpu_timing_loader(args.seconds_per_image)})
        try:
            with httpx.Client(base_url=service.url, timeout=600) as client:
                interactive_pass(client, times[:10])  # warm every path
                alone = interactive_pass(client, times)
                print(f"  no batch: {summary(alone)}", file=sys.stderr)
                batch_id = submit_batch(client, args.lines)
                while batch_state(client, batch_id)["status"] == "validating":
                    time.sleep(0.1)
                started = time.monotonic()
                with_batch = interactive_pass(client, times)
                done_during = batch_state(client, batch_id)["request_counts"]["completed"]
                print(f"  with batch: {summary(with_batch)}; {done_during} lines done meanwhile", file=sys.stderr)
                while (state := batch_state(client, batch_id))["status"] not in ("completed", "failed", "expired"):
                    time.sleep(0.5)
                batch_s = time.monotonic() - started
                stop = threading.Event()
                script_done, threads = client_script(client, args.lines, LINES_IN_FLIGHT, stop)
                with_script = interactive_pass(client, times)
                stop.set()
                for thread in threads:
                    thread.join()
                print(f"  with a client script: {summary(with_script)}; {len(script_done)} lines done meanwhile",
                      file=sys.stderr)
                name = next(n for n in serve.status().applications["imageserve"].deployments if "z-image" in n)
                handle = serve.get_deployment_handle(name, "imageserve")
                preemptions = handle.info.remote().result()["batch_preemptions"]
        finally:
            service.stop()
    report = {
        "seconds_per_image": args.seconds_per_image, "load": args.load, "requests": args.requests,
        "lines": args.lines, "no_batch": summary(alone), "with_batch": summary(with_batch),
        "p50_ratio": round(percentile(with_batch, 50) / percentile(alone, 50), 3),
        "p95_ratio": round(percentile(with_batch, 95) / percentile(alone, 95), 3),
        "with_client_script": {**summary(with_script), "lines_done": len(script_done),
                               "p50_ratio": round(percentile(with_script, 50) / percentile(alone, 50), 3),
                               "p95_ratio": round(percentile(with_script, 95) / percentile(alone, 95), 3)},
        "batch": {"status": state["status"], "completed": state["request_counts"]["completed"],
                  "failed": state["request_counts"]["failed"], "done_during_interactive_pass": done_during,
                  "seconds_to_complete": round(batch_s, 1), "preemptions": preemptions},
    }
    if args.json:
        print(json.dumps(report), file=out)
    else:
        print(f"T={args.seconds_per_image}s per image, interactive load {args.load:.0%}, {args.requests} requests, "
              f"{args.lines}-line batch", file=out)
        alone_row = report["no_batch"]
        print(f"  interactive, no batch:   p50 {alone_row['p50_ms']} ms, p95 {alone_row['p95_ms']} ms", file=out)
        print(f"  interactive, with batch: p50 {report['with_batch']['p50_ms']} ms, "
              f"p95 {report['with_batch']['p95_ms']} ms", file=out)
        print(f"  ratio: p50 x{report['p50_ratio']}, p95 x{report['p95_ratio']} (goal: within 1.15)", file=out)
        print(f"  batch: {report['batch']}", file=out)
        script = report["with_client_script"]
        print(f"  baseline, the same lines from a client script through the interactive route ({LINES_IN_FLIGHT} in "
              f"flight): p50 {script['p50_ms']} ms (x{script['p50_ratio']}), p95 {script['p95_ms']} ms "
              f"(x{script['p95_ratio']}), {script['lines_done']} lines done during the pass", file=out)
    return 0 if state["status"] == "completed" and state["request_counts"]["completed"] == args.lines else 1


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds-per-image", type=float, default=0.25, help="simulated GPU seconds per image (T)")
    parser.add_argument("--load", type=float, default=0.5, help="interactive load, a share of the replica's capacity")
    parser.add_argument("--requests", type=int, default=120, help="interactive requests in each pass")
    parser.add_argument("--lines", type=int, default=200, help="lines in the batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
