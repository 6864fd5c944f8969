"""The model replica without Ray: one engine, the batch queue, cancellation, errors, Serve options."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from deployments.model_replica import ModelReplica, pool_mismatch
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.errors import InternalError, ModelUnavailableError, ReplicaOutOfMemoryError
from serve_app.domain.schemas import GenerateRequest
from serve_app.domain.specs import resolve_application
from serve_app.engines import load_engine
from serve_app.engines.gpu_doubles import CUDA_FAULT_TRIGGER, OOM_TRIGGER, CudaFaultOnPrompt, OutOfMemoryOnSmallGPUs


def replica_spec(tiny_models, **model):
    config = parse_config({"device": {"device": "cpu"}, "serving": {"warmup": False},
                           "models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"]), **model}}})
    (spec,) = resolve_application(config).replicas
    return spec


class CountingLoader:
    """Loads the real engine and records the prompts of each pipeline call it makes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, spec):
        engine = load_engine(spec)
        real = engine.generate

        def counted(prompt, **kwargs):
            self.calls.append(1 if isinstance(prompt, str) else len(prompt))
            return real(prompt, **kwargs)

        engine.generate = counted
        return engine


def replica(tiny_models, loader=None, **model):
    return ModelReplica(replica_spec(tiny_models, **model), loader)


def request(prompt, seed, **extra):
    return GenerateRequest(prompt=prompt, seed=seed, **{"num_inference_steps": 2, **extra})


async def gather(srv, *calls):
    return await asyncio.gather(*(srv.run(r, w, h) for r, w, h in calls))


def test_same_shape_requests_share_one_pipeline_call_and_keep_their_seeds(tiny_models):
    loader = CountingLoader()
    srv = replica(tiny_models, loader, max_batch_size=4, batch_wait_timeout_s=0.2)
    results = asyncio.run(gather(srv, *[(request(f"prompt {i}", 10 * i), 64, 64) for i in range(4)]))
    assert loader.calls == [4]
    assert [r.seeds for r in results] == [[0], [10], [20], [30]]
    assert all(r.batch_images == 4 and r.pil_images()[0].size == (64, 64) for r in results)

    alone = asyncio.run(replica(tiny_models).run(request("prompt 2", 20), 64, 64))
    batched = np.asarray(results[2].pil_images()[0], dtype=int)
    assert np.abs(batched - np.asarray(alone.pil_images()[0], dtype=int)).max() <= 2


def test_requests_of_different_sizes_run_as_separate_calls(tiny_models):
    loader = CountingLoader()
    srv = replica(tiny_models, loader, max_batch_size=4, batch_wait_timeout_s=0.2)
    results = asyncio.run(gather(srv, (request("a", 1), 64, 64), (request("b", 2), 96, 64),
                                 (request("c", 3), 64, 64)))
    assert sorted(loader.calls) == [1, 2]
    assert [r.pil_images()[0].size for r in results] == [(64, 64), (96, 64), (64, 64)]
    assert [r.batch_images for r in results] == [2, 1, 2]


def test_a_request_as_large_as_the_batch_runs_alone(tiny_models):
    loader = CountingLoader()
    srv = replica(tiny_models, loader, max_batch_size=2)
    result = asyncio.run(srv.run(request("many", 5, n=2), 64, 64))
    assert loader.calls == [1] and result.seeds == [5, 6] and result.batch_images == 2


def test_batching_off_by_default_runs_each_request_alone_through_the_same_queue(tiny_models):
    loader = CountingLoader()
    srv = replica(tiny_models, loader)
    results = asyncio.run(gather(srv, (request("a", 1), 64, 64), (request("b", 2), 64, 64)))
    assert loader.calls == [1, 1]
    assert [r.batch_images for r in results] == [1, 1]
    assert all(r.timings["queue_s"] >= 0 and r.num_inference_steps == 2 for r in results)


def test_a_cancelled_batch_stops_between_steps(tiny_models):
    srv = replica(tiny_models, max_batch_size=4, batch_wait_timeout_s=0.0)

    async def cancel_while_running():
        task = asyncio.ensure_future(srv.run(request("slow", 1, num_inference_steps=100), 512, 512))
        while not srv._running:  # until the batch is in the worker thread
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while srv._running:  # the worker thread notices at its next step
            await asyncio.sleep(0.05)

    asyncio.run(cancel_while_running())
    assert srv.last_cancelled is not None and "of 100 steps" in srv.last_cancelled


def test_engine_failures_reach_the_caller_classified(tiny_models):
    spec = replica_spec(tiny_models)
    oom = ModelReplica(spec, lambda s: OutOfMemoryOnSmallGPUs(load_engine(s), 0))
    with pytest.raises(ReplicaOutOfMemoryError, match="ran out of memory on cpu"):
        asyncio.run(oom.run(request(OOM_TRIGGER, 1), 64, 64))
    assert asyncio.run(oom.run(request("next", 1), 64, 64)).images  # the same replica serves on

    faulty = ModelReplica(spec, lambda s: CudaFaultOnPrompt(load_engine(s)))
    with pytest.raises(ModelUnavailableError, match="CUDA fault"):
        asyncio.run(faulty.run(request(CUDA_FAULT_TRIGGER, 1), 64, 64))
    with pytest.raises(RuntimeError, match="must be replaced"):
        asyncio.run(faulty.check_health())
    with pytest.raises(ModelUnavailableError):
        asyncio.run(faulty.run(request("after the fault", 1), 64, 64))


def test_a_value_error_inside_the_pipeline_is_the_servers_fault_not_the_callers(tiny_models):
    """The router has checked the request; a ValueError from the pipeline (a size the VAE refuses here,
    or an attention backend that refuses a mask) is a 503 internal error, not a 4xx, and the replica
    keeps serving."""
    srv = replica(tiny_models)
    with pytest.raises(InternalError, match="ValueError"):
        asyncio.run(srv.run(request("odd size", 1), 65, 64))  # the VAE needs multiples of 16
    assert asyncio.run(srv.run(request("next", 1), 64, 64)).images


class OutOfMemoryHoldingActivations(OutOfMemoryOnSmallGPUs):
    """TEST DOUBLE for CUDA running out of memory mid-call: the frame that raises holds "activations"
    (an object the test watches), as a real failed forward holds its tensors. nunchaku words the error
    as a CUDA error."""

    def __init__(self, engine, watched: list) -> None:
        super().__init__(engine, 0)
        self.watched = watched

    def run(self, jobs, should_stop):
        activations = Activations()
        self.watched.append(weakref.ref(activations))
        raise RuntimeError("CUDA error: out of memory")


class Activations:
    pass


def test_out_of_memory_worded_as_a_cuda_error_is_oom_and_memory_is_freed_after_the_frames_go(
        tiny_models, monkeypatch):
    import deployments.model_replica as model_replica

    watched, alive_at_release = [], []

    def release_memory():  # as the real one: collect garbage, then (on CUDA) hand the cache back
        gc.collect()
        alive_at_release.append(watched[-1]() is not None)

    monkeypatch.setattr(model_replica, "_release_memory", release_memory)
    srv = ModelReplica(replica_spec(tiny_models),
                            lambda s: OutOfMemoryHoldingActivations(load_engine(s), watched))
    with pytest.raises(ReplicaOutOfMemoryError):
        asyncio.run(srv.run(request("too big", 1), 64, 64))
    assert alive_at_release == [False]  # released once, after the failed call's objects were gone
    asyncio.run(srv.check_health())  # not mistaken for a broken CUDA context


def test_a_replica_that_shuts_down_leaves_no_thread_running(tiny_models):
    import threading

    srv = replica(tiny_models)
    asyncio.run(srv.run(request("start the pipeline and encoder threads", 1), 64, 64))
    ours = [t for t in threading.enumerate() if t.name.startswith(("imageserve-memory", "pipeline-", "encode"))]
    assert any(t.name == "imageserve-memory" for t in ours) and any(t.name.startswith("pipeline-") for t in ours)
    srv.shutdown()
    assert not any(t.is_alive() for t in ours)


def test_a_replica_serves_only_its_variants_tasks(tiny_models, png_bytes):
    """One deployment class serves every variant; a request of a task the variant's family does not serve (a handle
    caller inside the cluster can send one straight to the replica) is refused before it is queued."""
    from serve_app.domain.errors import UnsupportedValueError
    from serve_app.domain.schemas import EditRequest

    srv = replica(tiny_models)
    with pytest.raises(UnsupportedValueError, match="z-image-turbo serves generate, not edit"):
        asyncio.run(srv.run(EditRequest(prompt="make it blue", images=[png_bytes]), 64, 64))
    assert srv.oldest_queued_age() is None  # refused before the queue


def test_batching_is_refused_for_edit_variants():
    with pytest.raises(ConfigError,
                       match=r"\(max_batch_size\): task=edit with batching=on: the edit pipeline takes one image set"):
        parse_config({"models": {"qwen-image-edit-2509": {"max_batch_size": 2}}})


def test_a_batching_deployment_gets_enough_ongoing_requests_per_replica():
    def options(model):
        config = parse_config({"models": {"z-image-turbo": model},
                               "serving": {"deployment": {"max_ongoing_requests": 2}}})
        (spec,) = resolve_application(config).replicas
        return ModelReplica.serve_options(spec)

    assert options({"max_batch_size": 8})["max_ongoing_requests"] == 16
    assert options({})["max_ongoing_requests"] == 2


def test_the_planner_counts_a_batch_as_more_activations(catalog):
    from serve_app.domain.calibration import default_calibration
    from serve_app.domain.planner import estimate_vram

    variant = catalog.variant("z-image-turbo")
    one = estimate_vram(variant, "none", 768, 768)  # a size no GPU measured: the sum of its parts
    eight = estimate_vram(variant, "none", 768, 768, batch_size=8)
    assert eight.weights_gib == one.weights_gib and eight.peak_stage == one.peak_stage == "vae"
    reserve = default_calibration().memory.reserve_fraction.value
    assert eight.peak_gib - one.peak_gib == pytest.approx(7 * one.activations_gib * (1 + reserve), abs=0.05)


def test_a_replica_checks_the_gpu_it_got_against_its_pool(catalog):
    assert pool_mismatch(catalog.gpu("rtx-4090"), catalog.gpu("rtx-4090")) is None
    assert pool_mismatch(catalog.gpu("rtx-4090"), catalog.gpu("rtx-6000-ada")) is None  # same sm, more memory
    # Both are "24 GB" cards, but the L4's ECC leaves it 22.49 GiB: what was planned for a 4090 may not fit.
    assert "but got L4 (sm_89, 22.49 GiB)" in pool_mismatch(catalog.gpu("rtx-4090"), catalog.gpu("l4"))
    why = pool_mismatch(catalog.gpu("a100-80g"), catalog.gpu("rtx-a4500"))
    assert "expects A100 80GB (sm_80, 79.6 GiB) but got RTX A4500 (sm_86, 19.9 GiB)" in why
    assert pool_mismatch(catalog.gpu("rtx-4090"), None) is None


async def last_event(events):
    return [event async for event in events][-1]


def test_a_background_line_yields_to_an_interactive_request_at_the_next_step_and_then_runs_again(tiny_models):
    """A batch line running when an interactive request arrives stops at its next denoising step, the interactive
    request runs, and the line runs again from the start: its images are those of a fresh run, bit for bit."""
    srv = replica(tiny_models)
    line = request("a lighthouse", 5, num_inference_steps=60)

    async def main():
        background = asyncio.ensure_future(last_event(srv.stream(line, 256, 256, background=True)))
        while not srv._running:  # until the line is in the worker thread
            await asyncio.sleep(0.01)
        interactive = await srv.run(request("a fox", 1), 64, 64)
        assert not background.done()  # it waits behind the interactive request, requeued
        return interactive, await background

    interactive, rerun = asyncio.run(main())
    assert srv._batches.preemptions == 1
    fresh = asyncio.run(srv.run(line, 256, 256))
    assert rerun.seeds == fresh.seeds == [5]
    assert rerun.images == fresh.images
