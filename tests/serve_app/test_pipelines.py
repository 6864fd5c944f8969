"""Real diffusers pipelines, loaded with from_pretrained from tiny random-weight checkpoints."""

import numpy as np
import pytest
from PIL import Image

from serve_app.catalog import default_catalog
from serve_app.config import OptimizationConfig, parse_config
from serve_app.pipelines import (
    GenerationCancelled,
    IncompatibleHardwareError,
    ModelLoadError,
    load_pipeline,
)


def tiny_config(tiny_models, **extra):
    models = {
        "z-image-turbo": {"source": str(tiny_models["z-image"])},
        "qwen-image-edit-2509": {"source": str(tiny_models["qwen-image-edit-2509"]),
                                 "edit_vae_image_area": 64 * 64, "edit_condition_image_area": 56 * 56},
        "qwen-image-edit-2511": {"source": str(tiny_models["qwen-image-edit-2511"]),
                                 "edit_vae_image_area": 64 * 64, "edit_condition_image_area": 56 * 56},
    }
    return parse_config({"device": {"device": "cpu"}, "models": models, **extra})


@pytest.fixture(scope="module")
def generator(tiny_models):
    return load_pipeline(default_catalog().variant("z-image-turbo"), tiny_config(tiny_models))


@pytest.fixture(scope="module", params=["qwen-image-edit-2509", "qwen-image-edit-2511"])
def editor(request, tiny_models):
    return load_pipeline(default_catalog().variant(request.param), tiny_config(tiny_models))


def pixels(image):
    return np.asarray(image)


def test_loads_the_real_pipeline_classes(generator, editor):
    assert type(generator.pipe).__name__ == "ZImagePipeline"
    assert type(editor.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert generator.device == "cpu" and generator.offload_mode == "none"
    if editor.variant.id == "qwen-image-edit-2511":
        assert editor.pipe.transformer.config.zero_cond_t is True


def test_generation_makes_images_of_the_asked_size(generator):
    result = generator.generate("a red fox", width=96, height=64, num_inference_steps=2, seed=1, n=2)
    assert [im.size for im in result.images] == [(96, 64), (96, 64)]
    assert result.seeds == [1, 2]
    assert result.steps == 2
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
    assert np.abs(pixels(batch.images[1]).astype(int) - pixels(single.images[0]).astype(int)).max() <= 1


def test_a_prompt_list_batches_requests_and_matches_separate_calls(generator):
    prompts = ["a boat", "a much longer prompt about a red lighthouse on a cliff at dusk"]
    batch = generator.generate(prompts, width=64, height=64, num_inference_steps=2, seed=[5, 9], n=2)
    assert batch.seeds == [5, 6, 9, 10]
    assert len(batch.images) == 4
    for i, (prompt, seed) in enumerate(zip(prompts, [5, 9])):
        alone = generator.generate(prompt, width=64, height=64, num_inference_steps=2, seed=seed, n=2)
        for j in range(2):
            diff = np.abs(pixels(batch.images[2 * i + j]).astype(int) - pixels(alone.images[j]).astype(int))
            # Padding the shorter prompt to the longer one's length is masked, so pixels barely move.
            assert diff.max() <= 2, (prompt, j, diff.max())


def test_a_prompt_list_needs_one_seed_per_prompt(generator):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generator.generate(["a", "b"], width=64, height=64, num_inference_steps=1, seed=[1])


def test_random_seed_is_reported(generator):
    result = generator.generate("a tree", width=64, height=64, num_inference_steps=1)
    assert isinstance(result.seeds[0], int) and result.seeds[0] >= 0


@pytest.mark.parametrize("count", [1, 2])
def test_edit_with_one_and_two_input_images(editor, count):
    inputs = [Image.new("RGB", (80, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))][:count]
    result = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=3)
    assert [im.size for im in result.images] == [(64, 80)]
    assert result.timings["vae_encode_s"] > 0
    again = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=3)
    other = editor.edit(inputs, "swap the colours", width=64, height=80, num_inference_steps=2, seed=4)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(result.images[0]), pixels(other.images[0]))


def test_edit_rejects_too_many_images(editor):
    with pytest.raises(ValueError, match="1 to 3 input images"):
        editor.edit([Image.new("RGB", (32, 32))] * 4, "x", num_inference_steps=1)


def test_cancellation_stops_denoising_early(generator):
    polls = []

    def stop_after_first_step():
        polls.append(1)
        return True

    with pytest.raises(GenerationCancelled, match="after 1 of 6 steps"):
        generator.generate("x", width=64, height=64, num_inference_steps=6, should_stop=stop_after_first_step)
    assert len(polls) == 1


def test_lightning_scheduler_overrides_are_applied(tiny_models, catalog):
    """The Lightning variant's scheduler settings land on the loaded scheduler (bf16 stand-in variant)."""
    lightning = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    stand_in = catalog.variant("qwen-image-edit-2509").model_copy(
        update={"scheduler_overrides": lightning.scheduler_overrides}
    )
    pipe = load_pipeline(stand_in, tiny_config(tiny_models))
    assert pipe.pipe.scheduler.config.base_shift == pytest.approx(1.0986, abs=1e-3)
    assert pipe.pipe.scheduler.config.time_shift_type == "exponential"


def test_missing_folder_is_a_clear_load_error(tiny_models, tmp_path, catalog):
    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {"source": str(tmp_path / "nope")}}})
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(catalog.variant("z-image-turbo"), config)


def test_uncached_hub_repo_offline_is_a_clear_load_error(tmp_path, catalog):
    config = parse_config({"device": {"device": "cpu"}, "hf": {"cache_dir": str(tmp_path)},
                           "models": {"z-image-turbo": {}}})
    with pytest.raises(ModelLoadError, match="Tongyi-MAI/Z-Image-Turbo is not available in the local Hugging Face cache"):
        load_pipeline(catalog.variant("z-image-turbo"), config)


def test_corrupt_weights_are_a_clear_load_error(tiny_models, tmp_path, catalog):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["z-image"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {"source": str(broken)}}})
    with pytest.raises(ModelLoadError, match="loading .* failed"):
        load_pipeline(catalog.variant("z-image-turbo"), config)


def test_four_bit_variants_refuse_cpu_before_loading(catalog, tmp_path):
    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo-svdq-int4-r128": {"source": str(tmp_path)}}})
    with pytest.raises(IncompatibleHardwareError, match="needs a CUDA GPU"):
        load_pipeline(catalog.variant("z-image-turbo-svdq-int4-r128"), config)


def test_weights_load_from_safetensors_only(tiny_models, tmp_path, catalog):
    """A checkpoint with pickle (.bin) weights is refused: no code runs from a weights file."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["z-image"], pickled)
    for weights in (pickled / "transformer").glob("*.safetensors"):
        torch.save(load_file(weights), weights.with_name("diffusion_pytorch_model.bin"))
        weights.unlink()
    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {"source": str(pickled)}}})
    with pytest.raises(ModelLoadError):
        load_pipeline(catalog.variant("z-image-turbo"), config)


def test_speed_options_are_applied_at_load(tiny_models):
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName

    config = tiny_config(tiny_models)
    config.models["z-image-turbo"].optimizations = OptimizationConfig(
        attention_backend="_native_math", vae_channels_last=True, compile_transformer=True)
    pipeline = load_pipeline(default_catalog().variant("z-image-turbo"), config)
    backends = {getattr(m.processor, "_attention_backend", None) for m in pipeline.pipe.transformer.modules()
                if hasattr(m, "processor")}
    assert backends == {AttentionBackendName._NATIVE_MATH}
    conv = next(m for m in pipeline.pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Compiled lazily: the first call compiles (tens of seconds on CPU), so this test does not call it.
    assert pipeline.pipe.transformer._compiled_call_impl is not None


def test_channels_last_handles_the_video_vae_and_goes_back(editor):
    import torch

    from serve_app.pipelines import set_channels_last

    set_channels_last(editor.pipe.vae)
    convs = [m for m in editor.pipe.vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert any(isinstance(m, torch.nn.Conv3d) for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d if isinstance(m, torch.nn.Conv3d)
                                      else torch.channels_last) for m in convs)
    result = editor.edit([Image.new("RGB", (64, 64), (1, 2, 3))], "x", width=64, height=64, num_inference_steps=1)
    assert result.images[0].size == (64, 64)
    set_channels_last(editor.pipe.vae, enabled=False)
    assert all(m.weight.is_contiguous() for m in convs)


def test_an_unusable_attention_backend_is_a_clear_load_error(tiny_models):
    config = tiny_config(tiny_models)
    config.models["z-image-turbo"].optimizations = OptimizationConfig(attention_backend="sage")
    with pytest.raises(ModelLoadError, match="attention_backend 'sage' is not usable here"):
        load_pipeline(default_catalog().variant("z-image-turbo"), config)
