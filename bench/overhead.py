"""What serving adds: the same tiny Z-Image pipeline called in-process, through a Serve handle, and over HTTP.

Each path runs sequentially and with 16 concurrent clients, side by side in one run, and the
script prints p50/p99 per path and the ratios to the in-process call.

    .venv/bin/python -m bench.overhead [--requests 40] [--concurrency 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import measure

PROMPT = "a lighthouse at dusk"
SIZE = 64
STEPS = 2


def deploy_serve_floor(png: bytes, prefix: str = "/floor") -> None:
    """Ray Serve's own cost for our topology: FastAPI ingress -> handle -> replica, no model work."""
    from fastapi import FastAPI
    from ray import serve

    from serve_app.domain.schemas import ImageResult

    @serve.deployment(name="floor-model", ray_actor_options={"num_cpus": 0})
    class FloorModel:
        async def generate(self, request, width, height):
            return ImageResult(variant="floor", images=[png], seeds=[request.seed or 0], width=width,
                               height=height, num_inference_steps=STEPS, created=int(time.time()))

    api = FastAPI()

    @serve.deployment(name="floor-ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, model):
            self.model = model

        @api.post("/v1/images/generations")
        async def generations(self, body: dict):
            from serve_app.domain.schemas import GenerateRequest

            result = await self.model.generate.remote(GenerateRequest(**body), SIZE, SIZE)
            return result.to_openai()

    serve.run(FloorIngress.bind(FloorModel.bind()), name="floor", route_prefix=prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per path and concurrency level")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import httpx
    import torch

    from serve_app.domain.images import encode_png
    from serve_app.domain.schemas import GenerateRequest
    from serve_app.domain.specs import engine_spec
    from serve_app.embedded import embedded_config
    from serve_app.engines import load_engine
    from serve_app.runner import LocalService

    tiny_dir = Path(tempfile.mkdtemp(prefix="imageserve-bench-"))
    config = embedded_config(tiny_dir)
    torch.set_num_threads(config.serving.torch_threads or 1)  # the replicas' setting, for a fair comparison
    catalog = config.build_catalog()
    pipeline = load_engine(engine_spec(config, catalog.variant("z-image-turbo"), catalog))
    results: dict[str, dict[str, dict[str, float]]] = {}
    levels = {"sequential": 1, f"concurrent_{args.concurrency}": args.concurrency}

    def summary(call, concurrency: int) -> dict:
        row = measure(call, args.requests, concurrency)
        row.pop("outcomes")
        return row

    def in_process(i: int) -> None:
        pipeline.generate(PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, seed=max(i, 0))

    sample_png = encode_png(pipeline.generate(PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS).images[0])

    results["in_process"] = {name: summary(in_process, c) for name, c in levels.items()}

    with LocalService(config, port=8123, log_to_driver=False) as service:
        from ray import serve

        handle = serve.get_app_handle(config.serving.app_name)

        def through_handle(i: int) -> None:
            request = GenerateRequest(prompt=PROMPT, size=f"{SIZE}x{SIZE}", num_inference_steps=STEPS, seed=max(i, 0))
            handle.generate.remote(request).result()

        results["handle"] = {name: summary(through_handle, c) for name, c in levels.items()}

        with httpx.Client(base_url=service.url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            def over_http(i: int) -> None:
                response = client.post("/v1/images/generations", json={
                    "prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS, "seed": max(i, 0)})
                response.raise_for_status()

            results["http"] = {name: summary(over_http, c) for name, c in levels.items()}

            deploy_serve_floor(sample_png)

            def serve_floor(i: int) -> None:
                response = client.post("/floor/v1/images/generations", json={
                    "prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS, "seed": max(i, 0)})
                response.raise_for_status()

            floor = {name: summary(serve_floor, c) for name, c in levels.items()}

    ratios = {
        path: {level: {"p50": round(results[path][level]["p50_ms"] / results["in_process"][level]["p50_ms"], 2),
                       "p99": round(results[path][level]["p99_ms"] / results["in_process"][level]["p99_ms"], 2)}
               for level in levels}
        for path in ("handle", "http")
    }
    added = {path: {level: round(results[path][level]["p50_ms"] - results["in_process"][level]["p50_ms"], 2)
                    for level in levels} for path in ("handle", "http")}
    # What our HTTP path adds beyond Ray Serve's own cost of the same two hops.
    beyond_floor = {level: round(added["http"][level] - floor[level]["p50_ms"], 2) for level in levels}
    report = {"workload": f"z-image-turbo tiny, {SIZE}x{SIZE}, {STEPS} steps, 1 replica, CPU",
              "paths": results, "ratio_to_in_process": ratios, "added_p50_ms": added,
              "serve_floor_http": floor, "http_added_beyond_serve_floor_p50_ms": beyond_floor}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["workload"])
    print(f"{'path':<11} {'level':<14} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'p50 x':>6} {'p99 x':>6}"
          f" {'+p50 ms':>8}")
    for path, by_level in results.items():
        for level, row in by_level.items():
            r = ratios.get(path, {}).get(level, {"p50": 1.0, "p99": 1.0})
            plus = added.get(path, {}).get(level, 0.0)
            print(f"{path:<11} {level:<14} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['requests_per_s']:>7.1f}"
                  f" {r['p50']:>6.2f} {r['p99']:>6.2f} {plus:>8.1f}")
    for level, row in floor.items():
        print(f"{'serve floor':<11} {level:<14} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}"
              f" {row['requests_per_s']:>7.1f}   (trivial model, same two hops;"
              f" HTTP adds {beyond_floor[level]:+.1f} ms p50 beyond it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
