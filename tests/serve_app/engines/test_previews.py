"""Stream previews: the clean-image estimate of a flow-matching step, the fitted latent-to-RGB map, and the
previews both real pipelines (tiny checkpoints) hand a streaming job."""

from types import SimpleNamespace

import pytest
import torch

from serve_app.domain.config import parse_config
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.engines.previews import LatentPreviewer, synthetic_images
from serve_app.engines.protocol import Job


def test_two_consecutive_euler_steps_give_back_the_clean_image():
    """A flow-matching path x(sigma) = (1 - sigma) x0 + sigma noise moves at velocity noise - x0; the Euler
    step from sigma to sigma_next lands on the path, so the estimate recovers x0 exactly."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    engine = SimpleNamespace(pipe=SimpleNamespace(scheduler=SimpleNamespace(sigmas=sigmas)))
    previewer = LatentPreviewer(engine, steps=[2], on_preview=lambda *a: None, width=64, height=64)
    at = [(1 - s) * x0 + s * noise for s in sigmas]  # the latents after each step i sit at sigmas[i + 1]
    previewer.previous = at[2]
    assert torch.allclose(previewer.clean_estimate(2, at[3]), x0, atol=1e-5)
    previewer.previous = None  # the first step: its starting noise was never seen
    assert torch.equal(previewer.clean_estimate(0, at[1]), at[1])


@pytest.fixture(scope="module")
def engines(tiny_models, load_engine_for):
    ids = ("z-image-turbo", "qwen-image-edit-2509")
    config = parse_config({"device": {"device": "cpu"},
                           "models": {i: {"source": str(tiny_models[i])} for i in ids}})
    return {i: load_engine_for(config, i) for i in ids}


@pytest.mark.parametrize("variant", ["z-image-turbo", "qwen-image-edit-2509"])
def test_the_fitted_map_is_the_least_squares_one_for_its_own_vae(engines, variant):
    """On the colour fields it was fitted on, no linear map does better; in particular not the mean colour
    (zero weights). How well it shows a real model's images needs real weights: random-weight VAEs encode
    colour barely linearly (the error here is close to the mean colour's)."""
    engine = engines[variant]
    matrix = engine.latent_rgb()
    pixels = synthetic_images()
    with torch.inference_mode():
        latents = engine.encode_for_preview(pixels).float()
    target = torch.nn.functional.avg_pool2d((pixels + 1) / 2, pixels.shape[-1] // latents.shape[-1])
    predicted = torch.einsum("bchw,cd->bdhw", latents, matrix[:-1]) + matrix[-1].view(1, 3, 1, 1)
    baseline = ((target - target.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean()
    error = ((predicted - target) ** 2).mean()
    assert error <= baseline
    nudged = matrix + 0.01 * torch.randn(matrix.shape, generator=torch.Generator().manual_seed(1))
    worse = torch.einsum("bchw,cd->bdhw", latents, nudged[:-1]) + nudged[-1].view(1, 3, 1, 1)
    assert error <= ((worse - target) ** 2).mean()


def test_a_streaming_generation_job_gets_previews_of_every_image_at_its_steps(engines):
    seen = []
    job = Job(GenerateRequest(prompt="a cat", n=2, stream=True, partial_images=2), 64, 48, 6,
              preview_steps=[1, 3], on_preview=lambda step, first, images: seen.append(
                  (step, first, [image.shape for image in images])))
    (result,) = engines["z-image-turbo"].run([job], should_stop=lambda: False)
    assert seen == [(1, 0, [(6, 8, 3)] * 2), (3, 0, [(6, 8, 3)] * 2)]  # latent resolution: 1/8 per side
    assert len(result.images) == 2


def test_an_edit_makes_its_n_images_one_call_each_and_previews_say_which(engines, encoded_png):
    seen = []
    job = Job(EditRequest(prompt="blue", images=[encoded_png], n=2, stream=True, partial_images=1), 64, 64, 4,
              preview_steps=[1], on_preview=lambda step, first, images: seen.append((step, first, len(images))))
    engines["qwen-image-edit-2509"].run([job], should_stop=lambda: False)
    assert seen == [(1, 0, 1), (1, 1, 1)]


def test_a_job_without_previews_is_batched_as_before(engines):
    engine = engines["z-image-turbo"]
    plain = [Job(GenerateRequest(prompt=p), 64, 64, 2) for p in ("a", "b")]
    streaming = Job(GenerateRequest(prompt="c", stream=True, partial_images=1), 64, 64, 2,
                    preview_steps=[0], on_preview=lambda *a: None)
    assert engine.batch_key(plain[0]) == engine.batch_key(plain[1]) != engine.batch_key(streaming)


@pytest.fixture
def encoded_png():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
