"""The Z-Image engine: the real ZImagePipeline, loaded with from_pretrained from a tiny checkpoint."""

import numpy as np
import pytest

from serve_app.domain.config import parse_config
from serve_app.domain.images import image_size, to_uint8
from serve_app.domain.schemas import GenerateRequest
from serve_app.engines.protocol import GenerationCancelled, ImageEngine, Job


@pytest.fixture(scope="module")
def generator(tiny_models, load_engine_for):
    config = parse_config({"device": {"device": "cpu"},
                           "models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}}})
    return load_engine_for(config, "z-image-turbo")


def pixels(image):
    return to_uint8(image).astype(int)


def test_loads_the_real_pipeline_class_and_implements_the_protocol(generator):
    assert type(generator.pipe).__name__ == "ZImagePipeline"
    assert isinstance(generator, ImageEngine)
    info = generator.info
    assert (info.device, info.offload_mode, info.torch_dtype) == ("cpu", "none", "float32")


def test_generation_makes_images_of_the_asked_size(generator):
    result = generator.generate("a red fox", width=96, height=64, num_inference_steps=2, seed=1, n=2)
    assert [image_size(im) for im in result.images] == [(96, 64), (96, 64)]
    assert result.seeds == [1, 2]
    assert result.steps == 2
    assert (result.batch_images, result.denoised_images) == (2, 2)
    assert {"text_encode_s", "denoise_s", "vae_decode_s", "total_s"} <= set(result.timings)


def test_same_seed_same_pixels_different_seed_different_pixels(generator):
    a = generator.generate("a lighthouse", width=64, height=64, num_inference_steps=2, seed=7)
    b = generator.generate("a lighthouse", width=64, height=64, num_inference_steps=2, seed=7)
    c = generator.generate("a lighthouse", width=64, height=64, num_inference_steps=2, seed=8)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def test_image_i_of_a_batch_equals_a_single_call_with_seed_plus_i(generator):
    batch = generator.generate("a boat", width=64, height=64, num_inference_steps=2, seed=20, n=2)
    single = generator.generate("a boat", width=64, height=64, num_inference_steps=2, seed=21)
    assert np.abs(pixels(batch.images[1]) - pixels(single.images[0])).max() <= 1


def test_a_prompt_list_batches_requests_and_matches_separate_calls(generator):
    prompts = ["a boat", "a much longer prompt about a red lighthouse on a cliff at dusk"]
    batch = generator.generate(prompts, width=64, height=64, num_inference_steps=2, seed=[5, 9], n=2)
    assert batch.seeds == [5, 6, 9, 10]
    assert len(batch.images) == 4
    for i, (prompt, seed) in enumerate(zip(prompts, [5, 9], strict=True)):
        alone = generator.generate(prompt, width=64, height=64, num_inference_steps=2, seed=seed, n=2)
        for j in range(2):
            diff = np.abs(pixels(batch.images[2 * i + j]) - pixels(alone.images[j]))
            # Padding the shorter prompt to the longer one's length is masked, so pixels barely move.
            assert diff.max() <= 2, (prompt, j, diff.max())


def test_a_prompt_list_needs_one_seed_per_prompt(generator):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generator.generate(["a", "b"], width=64, height=64, num_inference_steps=1, seed=[1])


def test_random_seed_is_reported(generator):
    result = generator.generate("a tree", width=64, height=64, num_inference_steps=1)
    assert isinstance(result.seeds[0], int) and result.seeds[0] >= 0


def test_cancellation_stops_denoising_early(generator):
    polls = []

    def stop_after_first_step():
        polls.append(1)
        return True

    with pytest.raises(GenerationCancelled, match="after 1 of 6 steps"):
        generator.generate("x", width=64, height=64, num_inference_steps=6, should_stop=stop_after_first_step)
    assert len(polls) == 1
    # Nobody waits for the image: the VAE decode is skipped, not run on the half-denoised latents.
    assert "vae_decode_s" not in generator._timer.seconds
    assert generator.generate("after", width=64, height=64, num_inference_steps=1).images  # decodes again


def test_stages_are_timed_between_cuda_synchronizations(monkeypatch, tiny_models):
    """TEST DOUBLE for CUDA's synchronize (no GPU here): on a CUDA engine every timed stage waits for
    the device before and after, so the VAE's kernels are not counted as denoising."""
    import torch

    from serve_app.engines.protocol import EngineInfo
    from serve_app.engines.random_weights import z_image_pipeline
    from serve_app.engines.z_image import ZImageEngine

    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: synchronized.append(1))
    config = parse_config({"device": {"device": "cpu"},
                           "models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}}})
    from serve_app.domain.specs import resolve_application

    (spec,) = resolve_application(config).replicas
    engine = ZImageEngine(spec.engine, z_image_pipeline("tiny"), EngineInfo("cuda", "float32", "none", 0.0))
    result = engine.generate("x", width=64, height=64, num_inference_steps=1, seed=0)
    stages = [k for k in ("text_encode_s", "vae_encode_s", "vae_decode_s") if k in result.timings]
    assert stages == ["text_encode_s", "vae_decode_s"] and len(synchronized) == 2 * len(stages)


def job(prompt, seed, width=64, height=64, steps=2, **extra):
    return Job(GenerateRequest(prompt=prompt, seed=seed, **extra), width, height, steps)


def test_jobs_of_one_shape_share_a_batch_key_and_one_call(generator):
    jobs = [job("a cat", 3), job("a dog", 4, n=1)]
    assert generator.batch_key(jobs[0]) == generator.batch_key(jobs[1])
    assert generator.batch_key(job("a cat", 3, width=96)) != generator.batch_key(jobs[0])
    assert generator.batch_key(job("a cat", 3, n=2)) != generator.batch_key(jobs[0])
    results = generator.run(jobs, should_stop=lambda: False)
    assert [r.seeds for r in results] == [[3], [4]]
    assert all(r.batch_images == 2 and len(r.images) == 1 for r in results)
    alone = generator.run([jobs[1]], should_stop=lambda: False)[0]
    assert np.abs(pixels(results[1].images[0]) - pixels(alone.images[0])).max() <= 2


def test_warm_up_runs_one_tiny_call_unless_the_transformer_is_compiled(generator, monkeypatch):
    calls = []
    real = generator.generate
    monkeypatch.setattr(generator, "generate", lambda prompt, **kw: calls.append(kw) or real(prompt, **kw))
    generator.warm_up()
    assert (calls[-1]["width"], calls[-1]["height"]) == (64, 64)
    # Compiled: torch.compile specializes on shapes, so the warm-up runs at the configured default size.
    compiled = generator.spec.model_copy(update={
        "optimizations": generator.spec.optimizations.model_copy(update={"compile_transformer": True}),
        "plan_width": 96, "plan_height": 80})
    monkeypatch.setattr(generator, "spec", compiled)
    generator.warm_up()
    assert (calls[-1]["width"], calls[-1]["height"], calls[-1]["num_inference_steps"]) == (96, 80, 1)


@pytest.mark.parametrize(("width", "height"), [(2048, 64), (64, 2048), (1040, 1024)])
def test_every_side_the_catalog_serves_runs(generator, width, height):
    """The tiny checkpoint's rotary tables are the real model's: past 1024 px the old ones raised IndexError."""
    assert generator.largest_side(generator.pipe) >= generator.variant.max_side
    result = generator.generate("a wide view", width=width, height=height, num_inference_steps=1, seed=0)
    assert image_size(result.images[0]) == (width, height)


def test_a_checkpoint_whose_tables_are_too_short_for_the_catalog_is_refused_at_load(tiny_models, load_engine_for):
    from serve_app.engines.protocol import ModelLoadError

    config = parse_config({
        "device": {"device": "cpu"},
        "models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}},
        "catalog": {"variants": [{**_catalog_entry("z-image-turbo"), "max_side": 16384}]},
    })
    with pytest.raises(ModelLoadError, match="takes images up to 8192 px a side"):
        load_engine_for(config, "z-image-turbo")


def _catalog_entry(variant_id: str) -> dict:
    from serve_app.domain.catalog import builtin_catalog_data

    entry = next(v for v in builtin_catalog_data()["variants"] if v["id"] == variant_id)
    return dict(entry)
