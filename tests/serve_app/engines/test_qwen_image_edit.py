"""The Qwen-Image-Edit engine: the real QwenImageEditPlusPipeline (2509 and 2511) from tiny checkpoints."""

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.domain.config import parse_config
from serve_app.domain.errors import BadImageError
from serve_app.domain.images import image_size, to_uint8
from serve_app.domain.schemas import EditRequest
from serve_app.engines.optimizations import set_channels_last
from serve_app.engines.protocol import ImageEngine, Job
from serve_app.engines.qwen_image_edit import input_image_areas

TINY_AREAS = {"edit_vae_image_area": 64 * 64, "edit_condition_image_area": 56 * 56}


@pytest.fixture(scope="module", params=["qwen-image-edit-2509", "qwen-image-edit-2511"])
def editor(request, tiny_models, load_engine_for):
    config = parse_config({"device": {"device": "cpu"},
                           "models": {request.param: {"source": str(tiny_models[request.param]), **TINY_AREAS}}})
    return load_engine_for(config, request.param)


def pixels(image):
    return to_uint8(image)


def png(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_loads_the_real_pipeline_class_and_implements_the_protocol(editor):
    assert type(editor.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert isinstance(editor, ImageEngine)
    if editor.variant.id == "qwen-image-edit-2511":
        assert editor.pipe.transformer.config.zero_cond_t is True


@pytest.mark.parametrize("count", [1, 2])
def test_edit_with_one_and_two_input_images(editor, count):
    inputs = [Image.new("RGB", (80, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))][:count]
    result = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=3)
    assert [image_size(im) for im in result.images] == [(64, 80)]
    assert result.timings["vae_encode_s"] > 0
    again = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=3)
    other = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=4)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(result.images[0]), pixels(other.images[0]))


def test_n_outputs_are_separate_calls_whose_timings_add_up(editor):
    result = editor.edit([Image.new("RGB", (64, 64))], "x", width=64, height=64, num_inference_steps=2, seed=5, n=2)
    assert result.seeds == [5, 6] and len(result.images) == 2
    assert (result.batch_images, result.denoised_images) == (1, 2)


def test_edit_rejects_too_many_images(editor):
    with pytest.raises(ValueError, match="1 to 3 input images"):
        editor.edit([Image.new("RGB", (32, 32))] * 4, "x", num_inference_steps=2)


def test_every_job_runs_alone_and_decodes_its_images(editor):
    first = Job(EditRequest(prompt="x", images=[png((9, 9, 9))], seed=1), 64, 64, 2)
    second = Job(EditRequest(prompt="x", images=[png((9, 9, 9))], seed=1), 64, 64, 2)
    assert editor.batch_key(first) != editor.batch_key(second)
    (result,) = editor.run([first], should_stop=lambda: False)
    assert result.seeds == [1] and image_size(result.images[0]) == (64, 64)
    broken = Job(EditRequest(prompt="x", images=[png((9, 9, 9))[:60]], seed=1), 64, 64, 2)
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        editor.run([broken], should_stop=lambda: False)


def test_input_areas_hold_only_for_the_engines_own_calls():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_module

    defaults = edit_module.VAE_IMAGE_SIZE, edit_module.CONDITION_IMAGE_SIZE
    with input_image_areas(64 * 64, 56 * 56):
        assert (edit_module.VAE_IMAGE_SIZE, edit_module.CONDITION_IMAGE_SIZE) == (64 * 64, 56 * 56)
    assert (edit_module.VAE_IMAGE_SIZE, edit_module.CONDITION_IMAGE_SIZE) == defaults


def test_channels_last_handles_the_video_vae_and_goes_back(editor):
    import torch

    set_channels_last(editor.pipe.vae)
    convs = [m for m in editor.pipe.vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert any(isinstance(m, torch.nn.Conv3d) for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d if isinstance(m, torch.nn.Conv3d)
                                      else torch.channels_last) for m in convs)
    result = editor.edit([Image.new("RGB", (64, 64), (1, 2, 3))], "x", width=64, height=64, num_inference_steps=2)
    assert image_size(result.images[0]) == (64, 64)
    set_channels_last(editor.pipe.vae, enabled=False)
    assert all(m.weight.is_contiguous() for m in convs)
