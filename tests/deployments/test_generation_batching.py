"""Dynamic batching in the generation deployment, exercised on the deployment class without Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.generation import GenerationServer
from serve_app.config import ConfigError, parse_config
from serve_app.pipelines import load_pipeline
from serve_app.schemas import GenerateRequest


def config_data(tiny_models, **model):
    return {"device": {"device": "cpu"}, "serving": {"warmup": False},
            "models": {"z-image-turbo": {"source": str(tiny_models["z-image"]), **model}}}


class CountingLoader:
    """Loads the real pipeline and counts calls to its ``generate`` (one per pipeline call)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, variant, config):
        pipeline = load_pipeline(variant, config)
        real = pipeline.generate

        def counted(prompt, **kwargs):
            self.calls.append(1 if isinstance(prompt, str) else len(prompt))
            return real(prompt, **kwargs)

        pipeline.generate = counted
        return pipeline


def server(tiny_models, loader=None, **model):
    return GenerationServer.func_or_class("z-image-turbo", config_data(tiny_models, **model), loader)


def request(prompt, seed, **extra):
    return GenerateRequest(prompt=prompt, seed=seed, **{"num_inference_steps": 2, **extra})


async def gather(srv, *calls):
    return await asyncio.gather(*(srv.generate(r, w, h) for r, w, h in calls))


def test_same_shape_requests_share_one_pipeline_call_and_keep_their_seeds(tiny_models):
    loader = CountingLoader()
    srv = server(tiny_models, loader, max_batch_size=4, batch_wait_timeout_s=0.2)
    results = asyncio.run(gather(srv, *[(request(f"prompt {i}", 10 * i), 64, 64) for i in range(4)]))
    assert loader.calls == [4]
    assert [r.seeds for r in results] == [[0], [10], [20], [30]]
    assert all(r.batch_images == 4 and r.pil_images()[0].size == (64, 64) for r in results)

    alone = asyncio.run(server(tiny_models).generate(request("prompt 2", 20), 64, 64))
    batched = np.asarray(results[2].pil_images()[0], dtype=int)
    assert np.abs(batched - np.asarray(alone.pil_images()[0], dtype=int)).max() <= 2


def test_requests_of_different_sizes_run_as_separate_calls(tiny_models):
    loader = CountingLoader()
    srv = server(tiny_models, loader, max_batch_size=4, batch_wait_timeout_s=0.2)
    results = asyncio.run(gather(srv, (request("a", 1), 64, 64), (request("b", 2), 96, 64),
                                 (request("c", 3), 64, 64)))
    assert sorted(loader.calls) == [1, 2]
    assert [r.pil_images()[0].size for r in results] == [(64, 64), (96, 64), (64, 64)]
    assert [r.batch_images for r in results] == [2, 1, 2]


def test_a_request_as_large_as_the_batch_runs_alone(tiny_models):
    loader = CountingLoader()
    srv = server(tiny_models, loader, max_batch_size=2)
    result = asyncio.run(srv.generate(request("many", 5, n=2), 64, 64))
    assert loader.calls == [1] and result.seeds == [5, 6] and result.batch_images == 2


def test_batching_off_by_default_runs_each_request_alone(tiny_models):
    loader = CountingLoader()
    srv = server(tiny_models, loader)
    asyncio.run(gather(srv, (request("a", 1), 64, 64), (request("b", 2), 64, 64)))
    assert loader.calls == [1, 1]


def test_a_cancelled_batch_stops_between_steps(tiny_models):
    srv = server(tiny_models, max_batch_size=4, batch_wait_timeout_s=0.0)

    async def cancel_while_running():
        task = asyncio.ensure_future(srv.generate(request("slow", 1, num_inference_steps=100), 512, 512))
        await asyncio.sleep(0.05)
        while srv._batches.pending():  # not yet taken into a batch
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the worker thread notices at its next step
            if srv.last_cancelled:
                break
            await asyncio.sleep(0.05)

    asyncio.run(cancel_while_running())
    assert srv.last_cancelled is not None and "of 100 steps" in srv.last_cancelled


def test_batching_is_refused_for_edit_variants():
    with pytest.raises(ConfigError, match="max_batch_size: the edit pipeline takes one image set"):
        parse_config({"models": {"qwen-image-edit-2509": {"max_batch_size": 2}}})


def test_a_batching_model_gets_enough_ongoing_requests_per_replica():
    config = parse_config({"models": {"z-image-turbo": {"max_batch_size": 8}},
                           "serving": {"deployment": {"max_ongoing_requests": 2}}})
    assert config.deployment_options("z-image-turbo").max_ongoing_requests == 16
    assert parse_config({"models": {"z-image-turbo": {}}}).deployment_options("z-image-turbo").max_ongoing_requests == 4


def test_the_planner_counts_a_batch_as_more_activations(catalog):
    from serve_app.planner import estimate_vram

    variant = catalog.variant("z-image-turbo")
    one = estimate_vram(variant, "none", 1024, 1024)
    eight = estimate_vram(variant, "none", 1024, 1024, batch_size=8)
    assert eight.weights_gib == one.weights_gib
    assert eight.peak_gib - one.peak_gib == pytest.approx(7 * one.activations_gib, abs=0.05)


