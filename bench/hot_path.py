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

Then, per format at one client, where the added time goes (``--hop-requests`` requests, medians), from
imageserve's own stamps (``timings``, and the ``Server-Timing`` header over HTTP) and the client's clock:
the replica's encode, replica -> router (``to_router_s``), the router writing the body (``answer``), the
rest until the response's headers reach the client (the request's way in, and router -> proxy), and
headers -> last byte (proxy -> client). Beside it, in the same Ray, Serve's floor for the same bytes: an
ingress and one replica that returns imageserve's very answer (the same JSON bytes, made once), which the
ingress sends as they are; over HTTP and through a handle. Nothing is cheaper for Serve to carry.

    .venv/bin/python -m bench.hot_path [--seconds-per-image 1.0,0.25] [--clients 1,4,16] [--formats png,jpeg]
                                       [--size 1024] [--rounds 3] [--hop-requests 20] [--json]
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


def deploy_serve_floor(answers: dict[str, bytes], results: dict) -> None:
    """Serve's own cost for these answers: FastAPI ingress -> handle -> one replica returning the answer's
    bytes, sent on as they are (no encode, no JSON work anywhere), at ``/floor``; ``answer`` by handle.
    Two steps toward imageserve's own transport, to price them: ``/floor/streamed`` calls the replica as a
    stream of two events (a small "accepted", then the bytes), as the router calls a model replica, and
    ``/floor/result`` has the replica return the ``ImageResult`` the router receives, whose body the ingress
    splices (``openai_body``)."""
    from fastapi import FastAPI, Response
    from ray import serve

    @serve.deployment(name="floor-replica", ray_actor_options={"num_cpus": 0})
    class FloorReplica:
        async def answer(self, fmt: str) -> bytes:
            return answers[fmt]

        async def streamed(self, fmt: str):
            yield {"accepted": fmt}
            yield answers[fmt]

        async def result(self, fmt: str):
            return results[fmt]

    api = FastAPI()

    @serve.deployment(name="floor-ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, replica) -> None:
            self.replica = replica

        @api.post("/v1/images/generations")
        async def generations(self, body: dict) -> Response:
            return Response(await self.replica.answer.remote(body["output_format"]), media_type="application/json")

        @api.post("/streamed/v1/images/generations")
        async def streamed(self, body: dict) -> Response:
            answer = None
            async for event in self.replica.options(stream=True).streamed.remote(body["output_format"]):
                answer = event
            return Response(answer, media_type="application/json")

        @api.post("/result/v1/images/generations")
        async def result(self, body: dict) -> Response:
            result = await self.replica.result.remote(body["output_format"])
            return Response(result.openai_body(), media_type="application/json")

        async def answer(self, fmt: str) -> bytes:
            return await self.replica.answer.remote(fmt)

    serve.run(FloorIngress.bind(FloorReplica.bind()), name="floor", route_prefix="/floor")


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: queue;dur=1.2, ...`` as {stage: milliseconds}."""
    stages = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, duration = part.partition(";dur=")
        stages[name] = float(duration)
    return stages


def hops(client, handle, floor_handle, fmt: str, body: dict, seconds_per_image: float, requests: int) -> dict:
    """Medians, in ms, of where one client's requests spend the time around the GPU, and Serve's floor."""
    samples: dict[str, list[float]] = {}

    def add(name: str, ms: float) -> None:
        samples.setdefault(name, []).append(ms)

    t_ms = 1000 * seconds_per_image
    for _ in range(requests):
        started = time.perf_counter()
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            headers_at = time.perf_counter()
            response.read()
        done = time.perf_counter()
        response.raise_for_status()
        stages = server_timing(response.headers["server-timing"])
        add("http added", 1000 * (done - started) - t_ms)
        for stage in ("queue", "encode", "to_router", "answer"):
            add(f"http {stage}", stages[stage])
        add("http rest to headers", 1000 * (headers_at - started) - sum(stages.values()))
        add("http headers to last byte", 1000 * (done - headers_at))
        add("bytes", len(response.content))

        started = time.perf_counter()
        result = handle.generate.remote(body_request(body)).result()
        done = time.perf_counter()
        add("handle added", 1000 * (done - started) - t_ms)
        timings = result.timings
        add("handle encode", 1000 * timings["encode_s"])
        add("handle to_router", 1000 * timings["to_router_s"])
        add("handle rest", 1000 * (done - started - sum(timings[k] for k in ("queue_s", "total_s", "encode_s",
                                                                               "to_router_s"))))

        for name, path in (("floor http", "/floor"), ("floor http, streamed", "/floor/streamed"),
                           ("floor http, ImageResult", "/floor/result")):
            started = time.perf_counter()
            floor = client.post(f"{path}/v1/images/generations", json=body)
            add(name, 1000 * (time.perf_counter() - started))
            floor.raise_for_status()
        started = time.perf_counter()
        floor_handle.answer.remote(fmt).result()
        add("floor handle", 1000 * (time.perf_counter() - started))
    return {name: round(percentile(values, 50), 1) for name, values in samples.items()}


def body_request(body: dict):
    from serve_app.domain.schemas import GenerateRequest

    return GenerateRequest(**body)


def run_hops(service, size: str, seconds_per_image: float, args: argparse.Namespace) -> dict:
    """The per-hop breakdown of imageserve's path at one client, beside Serve's floor (``deploy_serve_floor``)
    for the very bytes imageserve answered."""
    import httpx
    from ray import serve

    report = {}
    with httpx.Client(base_url=service.url, timeout=600) as client:
        bodies = {fmt: {"prompt": "a lighthouse at dusk", "size": size, "output_format": fmt, "seed": 1}
                  for fmt in args.formats}
        answers, results = {}, {}
        handle = serve.get_app_handle("pool")
        for fmt, body in bodies.items():
            response = client.post("/v1/images/generations", json=body)
            response.raise_for_status()
            answers[fmt] = response.content
            results[fmt] = handle.generate.remote(body_request(body)).result()
        deploy_serve_floor(answers, results)
        floor_handle = serve.get_app_handle("floor")
        for fmt, body in bodies.items():
            hops(client, handle, floor_handle, fmt, body, seconds_per_image, 2)  # warm every path
            report[fmt] = hops(client, handle, floor_handle, fmt, body, seconds_per_image, args.hop_requests)
            print(f"  T={seconds_per_image}s hops {fmt}: {report[fmt]}", file=sys.stderr)
    serve.delete("floor")
    return report


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
        hop_report = run_hops(service, size, seconds_per_image, args) if args.hop_requests else {}
    finally:
        service.stop()
    return results, hop_report


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
        results, hop_report = run_t(tiny_dir, seconds_per_image, args)
        report["runs"][str(seconds_per_image)] = {"results": results, "pool_vs_inline": ratios(results),
                                                  "hops": hop_report}
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
        for fmt, row in run_report["hops"].items():
            print_hops(fmt, row, float(t), out)
    return 0


def print_hops(fmt: str, row: dict, seconds_per_image: float, out) -> None:
    """One format's breakdown: each hop's median ms, and the goals' ratios against the floor."""
    print(f"\n{fmt}, one client, {row['bytes'] / 1e6:.2f} MB answer, medians (ms):", file=out)
    for name in ("http added", "http queue", "http encode", "http to_router", "http answer", "http rest to headers",
                 "http headers to last byte", "floor http", "floor http, streamed", "floor http, ImageResult",
                 "handle added", "handle encode", "handle to_router",
                 "handle rest", "floor handle"):
        print(f"  {name:<28} {row[name]:>8.1f}", file=out)
    over_http = row["http added"] - (row["http encode"] if fmt == "png" else 0.0)
    print(f"  HTTP added{' less the PNG encode' if fmt == 'png' else ''} / Serve floor: "
          f"{over_http / row['floor http']:.2f}x; handle: "
          f"{(row['handle added'] - (row['handle encode'] if fmt == 'png' else 0.0)) / row['floor handle']:.2f}x; "
          f"GPU kept at {seconds_per_image / (seconds_per_image + row['http added'] / 1000):.3f} of its limit "
          f"over HTTP", file=out)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds-per-image", type=floats, default=[1.0, 0.25],
                        help="simulated GPU seconds per image (T), comma-separated")
    parser.add_argument("--clients", type=ints, default=[1, 4, 16])
    parser.add_argument("--formats", type=lambda t: t.split(","), default=["png", "jpeg"])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client in each cell")
    parser.add_argument("--hop-requests", type=int, default=20,
                        help="requests per format for the per-hop breakdown at one client (0: none)")
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
