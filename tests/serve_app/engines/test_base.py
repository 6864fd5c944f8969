"""Loading, shared by every engine family: weights, device, scheduler overrides, speed options, clear errors."""

import shutil

import pytest

from serve_app.domain.config import OptimizationConfig, parse_config
from serve_app.domain.specs import engine_spec
from serve_app.engines import load_engine
from serve_app.engines.protocol import IncompatibleHardwareError, ModelLoadError


def cpu_config(models: dict, **extra):
    return parse_config({"device": {"device": "cpu"}, "models": models, **extra})


def test_lightning_scheduler_overrides_are_applied(tiny_models, catalog):
    """The Lightning variant's scheduler settings land on the loaded scheduler (bf16 stand-in variant)."""
    lightning = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    stand_in = catalog.variant("qwen-image-edit-2509").model_copy(
        update={"scheduler_overrides": lightning.scheduler_overrides})
    config = cpu_config({"qwen-image-edit-2509": {"source": str(tiny_models["qwen-image-edit-2509"])}})
    engine = load_engine(engine_spec(config, stand_in, catalog))
    assert engine.pipe.scheduler.config.base_shift == pytest.approx(1.0986, abs=1e-3)
    assert engine.pipe.scheduler.config.time_shift_type == "exponential"


def test_missing_folder_is_a_clear_load_error(tmp_path, load_engine_for):
    config = cpu_config({"z-image-turbo": {"source": str(tmp_path / "nope")}})
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_engine_for(config, "z-image-turbo")


def test_uncached_hub_repo_offline_is_a_clear_load_error(tmp_path, load_engine_for):
    config = cpu_config({"z-image-turbo": {}}, hf={"cache_dir": str(tmp_path)})
    offline = "Tongyi-MAI/Z-Image-Turbo is not available in the local Hugging Face cache"
    with pytest.raises(ModelLoadError, match=offline):
        load_engine_for(config, "z-image-turbo")


def test_corrupt_weights_are_a_clear_load_error(tiny_models, tmp_path, load_engine_for):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["z-image-turbo"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="loading .* failed"):
        load_engine_for(cpu_config({"z-image-turbo": {"source": str(broken)}}), "z-image-turbo")


def test_four_bit_variants_refuse_cpu_before_loading(tmp_path, load_engine_for):
    config = cpu_config({"z-image-turbo-svdq-int4-r128": {"source": str(tmp_path)}})
    with pytest.raises(IncompatibleHardwareError, match="needs a CUDA GPU"):
        load_engine_for(config, "z-image-turbo-svdq-int4-r128")


def test_weights_load_from_safetensors_only(tiny_models, tmp_path, load_engine_for):
    """A checkpoint with pickle (.bin) weights is refused: no code runs from a weights file."""
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["z-image-turbo"], pickled)
    for weights in (pickled / "transformer").glob("*.safetensors"):
        torch.save(load_file(weights), weights.with_name("diffusion_pytorch_model.bin"))
        weights.unlink()
    with pytest.raises(ModelLoadError):
        load_engine_for(cpu_config({"z-image-turbo": {"source": str(pickled)}}), "z-image-turbo")


def test_speed_options_are_applied_at_load(tiny_models, load_engine_for):
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName

    config = cpu_config({"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}})
    config.models["z-image-turbo"].optimizations = OptimizationConfig(
        attention_backend="_native_math", vae_channels_last=True, compile_transformer=True)
    engine = load_engine_for(config, "z-image-turbo")
    backends = {getattr(m.processor, "_attention_backend", None) for m in engine.pipe.transformer.modules()
                if hasattr(m, "processor")}
    assert backends == {AttentionBackendName._NATIVE_MATH}
    conv = next(m for m in engine.pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Compiled lazily: the first call compiles (tens of seconds on CPU), so this test does not call it.
    assert engine.pipe.transformer._compiled_call_impl is not None


def test_an_attention_backend_stays_with_its_own_transformer(tiny_models, load_engine_for):
    """diffusers' set_attention_backend also makes the backend the process-wide default, which every other model in
    the process (another swap-group member, say) then ran on: a maskless one broke Z-Image's masked calls."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    config = cpu_config({"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}})
    config.models["z-image-turbo"].optimizations = OptimizationConfig(attention_backend="_native_math")
    load_engine_for(config, "z-image-turbo")
    assert _AttentionBackendRegistry._active_backend == default


def test_a_transformer_whose_attention_takes_no_backend_is_refused_at_load(tiny_models):
    """nunchaku's attention modules are plain nn.Modules: diffusers' set_attention_backend changes nothing there,
    which was logged as applied."""
    from serve_app.engines.optimizations import set_attention_backend
    from serve_app.engines.random_weights import z_image_pipeline

    transformer = z_image_pipeline("tiny").transformer
    for module in transformer.modules():
        if hasattr(module, "processor"):
            module.processor = None  # what a transformer of other attention classes offers diffusers
    with pytest.raises(ModelLoadError, match="no attention module of ZImageTransformer2DModel takes"):
        set_attention_backend(transformer, "_native_math")


def test_an_unusable_attention_backend_is_a_clear_load_error(tiny_models, load_engine_for):
    config = cpu_config({"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}})
    config.models["z-image-turbo"].optimizations = OptimizationConfig(attention_backend="sage")
    with pytest.raises(ModelLoadError, match="attention_backend 'sage' is not usable here"):
        load_engine_for(config, "z-image-turbo")


# Qwen-Image-Lightning's reference schedules at 1024x1024 (ModelTC/Qwen-Image-Lightning: shift 3,
# no terminal stretch): sigma' = 3 s / (1 + 2 s) over s = linspace(1, 1/steps, steps).
LIGHTNING_SIGMAS = {4: [1.0, 0.9, 0.75, 0.5], 8: [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]}


@pytest.mark.parametrize("variant_id, steps", [("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", 4),
                                               ("qwen-image-edit-2509-svdq-fp4-r32-lightning-8step", 8)])
def test_lightning_variants_denoise_on_lightnings_own_sigmas(tiny_models, catalog, variant_id, steps):
    """The checkpoint's scheduler (shift_terminal 0.02, as in the real repository) under the variant's
    overrides gives the sigmas the edit pipeline computes at 1024x1024, and they are Lightning's."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    lightning = catalog.variant(variant_id)
    stand_in = catalog.variant("qwen-image-edit-2509").model_copy(
        update={"scheduler_overrides": lightning.scheduler_overrides})
    config = cpu_config({"qwen-image-edit-2509": {"source": str(tiny_models["qwen-image-edit-2509"])}})
    scheduler = load_engine(engine_spec(config, stand_in, catalog)).pipe.scheduler
    c = scheduler.config
    mu = calculate_shift((1024 // 16) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert scheduler.sigmas[:-1].tolist() == pytest.approx(LIGHTNING_SIGMAS[steps], abs=1e-4)


def test_per_block_offload_excludes_the_transformer_on_this_pipeline_only():
    """TEST DOUBLE for nunchaku's Qwen-Image ``set_offload`` (the tiny transformer is diffusers'). Sequential
    offload needs an accelerator, so the call ends in an error here; the exclusion must not leak to the class."""
    from diffusers import QwenImageEditPlusPipeline

    from serve_app.engines.loading import apply_offload
    from serve_app.engines.random_weights import qwen_image_edit_pipeline

    pipe, other = qwen_image_edit_pipeline("tiny"), qwen_image_edit_pipeline("tiny")
    offloads = []
    pipe.transformer.set_offload = lambda offload, **kwargs: offloads.append((offload, kwargs))
    with pytest.raises(Exception):  # noqa: B017 - whatever accelerate raises without a GPU
        apply_offload(pipe, "sequential", "cuda", nunchaku_transformer=True)
    assert offloads == [(True, {"use_pin_memory": False, "num_blocks_on_gpu": 1})]
    assert pipe._exclude_from_cpu_offload == ["transformer"]
    assert QwenImageEditPlusPipeline._exclude_from_cpu_offload == [] and other._exclude_from_cpu_offload == []


def test_per_block_offload_of_a_transformer_without_set_offload_is_refused_by_name():
    """nunchaku's Z-Image transformer has no ``set_offload`` in any release: a catalog entry that asks for it
    fails its load with the fix, not an AttributeError."""
    from serve_app.engines.loading import apply_offload
    from serve_app.engines.random_weights import z_image_pipeline

    with pytest.raises(ModelLoadError, match="no per-block offload .*per_block_offload: false"):
        apply_offload(z_image_pipeline("tiny"), "sequential", "cuda", nunchaku_transformer=True)


def test_turing_runs_float16_and_refuses_bfloat16():
    """sm_75 has no bfloat16: nunchaku's int4 kernels run float16 there."""
    from serve_app.domain.catalog import GPUClass
    from serve_app.engines.hardware import compute_dtype

    t4 = GPUClass(id="t4", name="T4", compute_capability="7.5", architecture="Turing", vram_gib=16)
    a4500 = GPUClass(id="a", name="RTX A4500", compute_capability="8.6", architecture="Ampere", vram_gib=20)
    assert compute_dtype(None, "cuda", t4) == "float16"
    assert compute_dtype(None, "cuda", a4500) == "bfloat16"
    assert compute_dtype(None, "cpu", None) == "float32"
    assert compute_dtype("float16", "cuda", a4500) == "float16"
    with pytest.raises(IncompatibleHardwareError, match="T4 \\(sm_75\\) has no bfloat16"):
        compute_dtype("bfloat16", "cuda", t4)
