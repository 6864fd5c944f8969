"""The Qwen-Image-2.1 engine: the real QwenImage21Pipeline from its tiny checkpoint, generating and editing."""

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.domain.config import parse_config
from serve_app.domain.images import image_size, to_uint8
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.engines.protocol import GenerationCancelled, ImageEngine, Job

VARIANT = "qwen-image-2.1"


def config_for(tiny_models, **model):
    return parse_config({"device": {"device": "cpu"}, "models": {VARIANT: {
        "source": str(tiny_models[VARIANT]), "edit_vae_image_area": 64 * 64, **model}}})


@pytest.fixture(scope="module")
def engine(tiny_models, load_engine_for):
    return load_engine_for(config_for(tiny_models), VARIANT)


def png(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def run(engine, request, width=64, height=64, steps=2, should_stop=lambda: False):
    (result,) = engine.run([Job(request, width, height, steps)], should_stop=should_stop)
    return result


def test_loads_the_real_pipeline_class_and_implements_the_protocol(engine):
    assert type(engine.pipe).__name__ == "QwenImage21Pipeline"
    assert isinstance(engine, ImageEngine)
    assert engine.variant.tasks == ("generate", "edit")


def test_one_engine_generates_and_edits_rgb_images_of_the_size_asked(engine):
    made = run(engine, GenerateRequest(prompt="a lighthouse", seed=3, n=2), width=64, height=96)
    assert [image_size(image) for image in made.images] == [(64, 96)] * 2
    assert all(image.shape[-1] == 3 for image in made.images)  # the pipeline's RGBA, kept as RGB
    assert made.seeds == [3, 4] and made.prompt_tokens > 0 and "vae_encode_s" not in made.timings
    edited = run(engine, EditRequest(prompt="make it blue", images=[png((200, 20, 20)), png((20, 20, 200))], seed=3))
    assert [image_size(image) for image in edited.images] == [(64, 64)]
    assert edited.timings["vae_encode_s"] > 0  # the condition images went through the VAE


def test_a_seed_makes_the_same_image_and_the_condition_image_matters(engine):
    first = run(engine, EditRequest(prompt="make it blue", images=[png((200, 20, 20))], seed=5))
    again = run(engine, EditRequest(prompt="make it blue", images=[png((200, 20, 20))], seed=5))
    other = run(engine, EditRequest(prompt="make it blue", images=[png((20, 200, 20))], seed=5))
    assert np.array_equal(to_uint8(first.images[0]), to_uint8(again.images[0]))
    assert not np.array_equal(to_uint8(first.images[0]), to_uint8(other.images[0]))


def test_the_steps_asked_are_the_steps_run_even_where_the_checkpoint_configures_a_sigma_grid(engine):
    assert run(engine, GenerateRequest(prompt="x", seed=1), steps=3).steps == 3
    engine.pipe.register_to_config(sample_sigmas=[1.0, 0.75, 0.5, 0.25])
    try:
        assert engine.sigmas(4) is None  # the checkpoint's own grid, where it has that many steps
        assert run(engine, GenerateRequest(prompt="x", seed=1), steps=2).steps == 2
    finally:
        engine.pipe.register_to_config(sample_sigmas=None)


def test_a_cancelled_call_leaves_nothing_behind_for_the_next(engine, tiny_models, load_engine_for):
    calls = iter(range(100))
    with pytest.raises(GenerationCancelled):
        run(engine, EditRequest(prompt="make it blue", images=[png((200, 20, 20))], seed=1), steps=4,
            should_stop=lambda: next(calls) >= 1)
    after = run(engine, GenerateRequest(prompt="a fox", seed=9), width=96, height=64)
    fresh = run(load_engine_for(config_for(tiny_models), VARIANT), GenerateRequest(prompt="a fox", seed=9), width=96,
                height=64)
    assert np.array_equal(to_uint8(after.images[0]), to_uint8(fresh.images[0]))


def test_a_stream_gets_previews_of_the_size_asked(engine):
    seen = []
    job = Job(GenerateRequest(prompt="x", seed=2), 64, 96, 3, preview_steps=[0, 1],
              on_preview=lambda step, first, images: seen.append((step, [image.shape for image in images])))
    engine.run([job], should_stop=lambda: False)
    assert [step for step, _ in seen] == [0, 1]
    assert all(shape[-1] == 3 for _, shapes in seen for shape in shapes)
