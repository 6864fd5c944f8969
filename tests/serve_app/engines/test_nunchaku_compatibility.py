"""Contract tests: each known nunchaku release, as its TEST DOUBLE (nunchaku_releases/README.md), runs
inside the real diffusers 0.42 pipelines through the engines' real loading path.

The doubles reproduce the releases' signatures and their calls into diffusers; without the adapters of
``serve_app.engines.nunchaku_support`` those calls fail exactly as the real releases do on a GPU.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from serve_app.domain.config import parse_config
from serve_app.domain.images import image_size
from serve_app.domain.specs import engine_spec
from serve_app.engines.loading import LoadTarget
from serve_app.engines.nunchaku_support import NunchakuIncompatibleError, fit_to_diffusers, nunchaku_status

RELEASES = Path(__file__).with_name("nunchaku_releases")
SHARED = RELEASES / "_common"  # what both doubles share
Z_IMAGE_4BIT = "z-image-turbo-svdq-int4-r128"
EDIT_4BIT = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"
CPU = LoadTarget(device="cpu", gpu=None, offload_mode="none", planned_peak_gib=None, torch_dtype="float32")


@pytest.fixture(params=["v1_1_0", "successor"])
def release(request, nunchaku_on_path):
    """One release's double importable as ``nunchaku`` (with its distribution metadata)."""
    nunchaku_on_path(SHARED, RELEASES / request.param)
    return request.param


def four_bit_spec(tiny_models, catalog, tmp_path, variant_id):
    """The 4-bit variant configured with a local transformer file (the double reads the tiny
    full-precision transformer saved beside it)."""
    variant = catalog.variant(variant_id)
    checkpoint = tiny_models[variant.base_model]
    folder = tmp_path / "nunchaku-transformer"
    shutil.copytree(checkpoint / "transformer", folder)
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / variant.source.transformer_file)
    model = {"source": str(checkpoint), "transformer_source": str(folder)}
    if "edit" in variant.tasks:
        model.update(edit_vae_image_area=64 * 64, edit_condition_image_area=56 * 56)
    config = parse_config({"device": {"device": "cpu"}, "models": {variant_id: model}})
    return engine_spec(config, variant, catalog)


def test_the_doubles_are_recognised_as_the_real_nunchaku_with_their_versions(release):
    usable, why = nunchaku_status()
    assert usable, why
    assert ("nunchaku 1.1.0+torch2.9" if release == "v1_1_0" else "nunchaku 0+successor.test.double") in why


def rope_hooked_attentions(transformer) -> list[str]:
    """The attention modules the successor's ``register_rope_hook`` hooks: every block's of ``layers``,
    and unless ``skip_refiners``, of ``noise_refiner`` and ``context_refiner``."""
    groups = ["layers"] + ([] if transformer.skip_refiners else ["noise_refiner", "context_refiner"])
    return [f"{group}.{i}.attention" for group in groups for i in range(len(getattr(transformer, group)))]


def test_only_the_qwen_image_transformer_offloads_per_block_in_each_release(release, tiny_models):
    """As in both releases: Z-Image has no set_offload and refuses offload at load; Qwen-Image has
    set_offload(offload, **kwargs), which takes base.apply_offload's call."""
    import nunchaku

    z_image, qwen = nunchaku.NunchakuZImageTransformer2DModel, nunchaku.NunchakuQwenImageTransformer2DModel
    assert not hasattr(z_image, "set_offload")
    with pytest.raises(NotImplementedError, match="Offload is not supported"):
        z_image.from_pretrained(str(tiny_models["z-image-turbo"] / "transformer" / "t.safetensors"), offload=True)
    assert list(inspect.signature(qwen.set_offload).parameters) == ["self", "offload", "kwargs"]
    transformer = qwen.from_pretrained(str(tiny_models["qwen-image-edit-2509"] / "transformer" / "t.safetensors"))
    assert transformer.offload is False and transformer.offload_settings is None
    transformer.set_offload(True, use_pin_memory=False, num_blocks_on_gpu=1)  # what apply_offload calls
    assert transformer.offload is True
    assert transformer.offload_settings == {"use_pin_memory": False, "num_blocks_on_gpu": 1}


@pytest.mark.parametrize("skip_refiners", [False, True])
def test_the_successor_hooks_the_rope_of_the_refiners_too(skip_refiners, nunchaku_on_path, tiny_models):
    """The successor's register_rope_hook covers layers, noise_refiner and context_refiner (the refiners
    only when the checkpoint quantized them), and unregister_rope_hook takes every hook off."""
    nunchaku_on_path(SHARED, RELEASES / "successor")
    import nunchaku

    transformer = nunchaku.NunchakuZImageTransformer2DModel.from_pretrained(
        str(tiny_models["z-image-turbo"] / "transformer" / "t.safetensors"))
    transformer.skip_refiners = skip_refiners
    expected = rope_hooked_attentions(transformer)
    assert len(transformer.noise_refiner) > 0 and len(transformer.context_refiner) > 0  # the tiny model has them
    transformer.register_rope_hook(lambda module, args, kwargs: None)
    hooked = sorted(name for name, module in transformer.named_modules() if module._forward_pre_hooks)
    assert hooked == sorted(expected) and len(transformer.rope_hook_handles) == len(expected)
    assert any(name.startswith("noise_refiner") for name in hooked) is not skip_refiners
    transformer.unregister_rope_hook()
    assert not any(module._forward_pre_hooks for module in transformer.modules())


def test_the_4bit_z_image_variant_generates_with_each_release(release, tiny_models, catalog, tmp_path):
    from serve_app.engines.z_image import ZImageEngine

    engine = ZImageEngine.load(four_bit_spec(tiny_models, catalog, tmp_path, Z_IMAGE_4BIT), CPU)
    assert type(engine.pipe.transformer).__module__ == "nunchaku.models"
    result = engine.generate(["a boat", "a much longer prompt about a lighthouse"], width=64, height=64,
                             num_inference_steps=2, seed=[1, 2])  # batched prompts: the masked path
    assert [image_size(image) for image in result.images] == [(64, 64), (64, 64)]
    if release == "successor":
        # nunchaku's own rope hooks ran inside the adapted forward, on the attention of every block the
        # real one hooks (the refiners too), each given freqs_cis by keyword as the real hook needs.
        hook = sys.modules["nunchaku.models"].NunchakuZImageRopeHook
        transformer = engine.pipe.transformer
        names = {module: name for name, module in transformer.named_modules()}
        assert hook.calls > 0 and all(keyword for _, keyword in hook.seen)
        assert {names[module] for module, _ in hook.seen} == set(rope_hooked_attentions(transformer))
        assert transformer.rope_hook_handles == []  # and came off again


def test_the_4bit_edit_variant_edits_with_each_release(release, tiny_models, catalog, tmp_path):
    from serve_app.engines.qwen_image_edit import QwenImageEditEngine

    engine = QwenImageEditEngine.load(four_bit_spec(tiny_models, catalog, tmp_path, EDIT_4BIT), CPU)
    transformer = engine.pipe.transformer
    assert type(transformer).__module__ == "nunchaku.models"
    result = engine.edit([Image.new("RGB", (64, 64), (200, 10, 10))], "make it blue", width=64, height=64,
                         num_inference_steps=2, true_cfg_scale=4.0, seed=3)  # CFG: two calls a step
    assert image_size(result.images[0]) == (64, 64)
    if release == "v1_1_0":
        # The adapted rope took the text length of the call it served, as the old txt_seq_lens did.
        assert transformer.pos_embed.text_length is not None and transformer.pos_embed.text_length > 0


@pytest.mark.parametrize("release_name, family, failure", [
    ("v1_1_0", "edit", "got multiple values for argument 'device'"),
    ("successor", "generate", "unexpected keyword argument 'joint_attention_kwargs'"),
])
def test_without_the_adapters_each_release_fails_in_diffusers_0_42_as_on_a_gpu(
        release_name, family, failure, tiny_models, catalog, tmp_path, monkeypatch, nunchaku_on_path):
    """The doubles are faithful: unadapted, they break inside the real pipeline call."""
    import serve_app.engines.nunchaku_support as support
    from serve_app.engines.qwen_image_edit import QwenImageEditEngine
    from serve_app.engines.z_image import ZImageEngine

    nunchaku_on_path(SHARED, RELEASES / release_name)
    monkeypatch.setattr(support, "ADAPTERS", ())
    monkeypatch.setattr(support, "accepted_keywords", lambda function: None)  # skip the refusal too
    if family == "edit":
        engine = QwenImageEditEngine.load(four_bit_spec(tiny_models, catalog, tmp_path, EDIT_4BIT), CPU)
        call = lambda: engine.edit([Image.new("RGB", (64, 64))], "x", width=64, height=64,  # noqa: E731
                                   num_inference_steps=1, seed=0)
    else:
        engine = ZImageEngine.load(four_bit_spec(tiny_models, catalog, tmp_path, Z_IMAGE_4BIT), CPU)
        call = lambda: engine.generate("x", width=64, height=64, num_inference_steps=1, seed=0)  # noqa: E731
    with pytest.raises(TypeError, match=failure):
        call()


def test_a_release_no_adapter_knows_is_refused_by_name(tiny_models):
    """A transformer whose forward lacks an argument the pipeline passes is refused at load, naming the
    versions, not discovered by the first request."""
    from diffusers import QwenImageTransformer2DModel

    from serve_app.engines.qwen_image_edit import QwenImageEditEngine

    class FutureTransformer(QwenImageTransformer2DModel):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, img_shapes=None,
                    return_dict=True):
            raise AssertionError("never called")

    transformer = FutureTransformer.from_pretrained(tiny_models["qwen-image-edit-2509"] / "transformer")
    with pytest.raises(NunchakuIncompatibleError,
                       match=r"diffusers 0\.42\.\d+ do not fit: FutureTransformer\.forward takes no attention_kwargs"):
        fit_to_diffusers(transformer, "QwenImageEditPlusPipeline", QwenImageEditEngine.transformer_call_keywords)


def test_doctor_shows_how_each_release_fits_this_diffusers(release, capsys):
    from serve_app.cli import main

    main(["doctor", "--json"])
    fit = __import__("json").loads(capsys.readouterr().out)["nunchaku"]["compatibility"]
    expected = {"v1_1_0": {"ZImagePipeline": [], "QwenImageEditPlusPipeline": ["qwen-rope-call"]},
                "successor": {"ZImagePipeline": ["z-image-forward-call"], "QwenImageEditPlusPipeline": []}}[release]
    assert {p: v["adapters"] for p, v in fit["pipelines"].items()} == expected
    assert all(v["works"] for v in fit["pipelines"].values()) and fit["diffusers"].startswith("0.42")
