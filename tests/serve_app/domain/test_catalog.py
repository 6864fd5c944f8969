import pytest
from pydantic import ValidationError

from serve_app.domain.catalog import build_catalog

REQUIRED_VARIANTS = [
    "z-image-turbo",
    "z-image-turbo-svdq-int4-r128",
    "z-image-turbo-svdq-fp4-r32",
    "qwen-image-edit-2509",
    "qwen-image-edit-2509-svdq-int4-r128-lightning-4step",
    "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step",
    "qwen-image-edit-2511",
]


def test_catalog_has_every_required_variant(catalog):
    assert set(REQUIRED_VARIANTS) <= set(catalog.variants)


def test_parameter_counts_are_the_facts(catalog):
    zimage = catalog.variant("z-image-turbo")
    assert zimage.components["transformer"].params_b == pytest.approx(6.155)
    assert zimage.components["text_encoder"].params_b == pytest.approx(4.022)
    qwen = catalog.variant("qwen-image-edit-2511")
    assert qwen.components["transformer"].params_b == pytest.approx(20.430)
    assert qwen.components["text_encoder"].params_b == pytest.approx(8.292)
    # bf16 bytes of the edit transformer alone: 38.05 GiB (docs/facts.md)
    assert qwen.transformer.weight_bytes("bf16") / 2**30 == pytest.approx(38.05, abs=0.01)


def test_defaults_follow_the_model_cards(catalog):
    zimage = catalog.variant("z-image-turbo").defaults
    assert (zimage.num_inference_steps, zimage.guidance_scale) == (8, 0.0)
    edit = catalog.variant("qwen-image-edit-2509").defaults
    assert (edit.true_cfg_scale, edit.negative_prompt, edit.num_inference_steps) == (4.0, " ", 40)
    lightning = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    assert (lightning.defaults.num_inference_steps, lightning.defaults.true_cfg_scale) == (4, 1.0)
    assert lightning.scheduler_overrides["time_shift_type"] == "exponential"


def test_gpu_four_bit_support_follows_nunchaku_rules(catalog):
    assert catalog.gpu("RTX 4000 Ada").four_bit == "int4"
    assert catalog.gpu("rtx-a4500").four_bit == "int4"
    assert catalog.gpu("rtx-5090").four_bit == "fp4"
    assert catalog.gpu("h100-sxm").four_bit is None
    assert catalog.gpu("h200").four_bit is None


def test_aliases_prefer_the_same_named_variant(catalog):
    assert catalog.candidates("z-image-turbo")[0].id == "z-image-turbo"
    assert {v.tasks for v in catalog.candidates("qwen-image-edit")} == {("edit",)}
    assert catalog.candidates("qwen-image-edit-2509")[0].id == "qwen-image-edit-2509"


def test_unknown_names_list_the_known_ones(catalog):
    with pytest.raises(KeyError, match="known: .*z-image-turbo"):
        catalog.variant("sdxl")
    with pytest.raises(KeyError, match="rtx-4090"):
        catalog.gpu("Voodoo 2")


def test_match_gpu_name_takes_the_longest_catalog_name(catalog):
    assert catalog.match_gpu_name("NVIDIA GeForce RTX 4090").id == "rtx-4090"
    assert catalog.match_gpu_name("NVIDIA RTX 4000 Ada Generation").id == "rtx-4000-ada"
    assert catalog.match_gpu_name("Tesla K80") is None


# Device names as nvidia-smi and torch.cuda.get_device_name print them, and the class each card is.
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": "h100-sxm",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA A100-SXM4-80GB": "a100-80g",
    "NVIDIA A100 80GB PCIe": "a100-80g",
    "NVIDIA A100-SXM4-40GB": "a100-40g",
    "NVIDIA A100-PCIE-40GB": "a100-40g",
    "NVIDIA GeForce RTX 3060": "rtx-3060-12g",
    "NVIDIA L40": "l40",
    "NVIDIA L40S": "l40s",
    "NVIDIA L4": "l4",
    "NVIDIA A40": "a40",
    "NVIDIA RTX A4500": "rtx-a4500",
    "NVIDIA GeForce RTX 5090": "rtx-5090",
    "NVIDIA H200": "h200",
}


@pytest.mark.parametrize("device_name, gpu_id", DEVICE_NAMES.items())
def test_real_device_names_map_to_their_class(catalog, device_name, gpu_id):
    assert catalog.match_gpu_name(device_name).id == gpu_id
    assert catalog.gpu(device_name).id == gpu_id  # `imageserve plan --gpu` takes the name nvidia-smi prints


def test_an_unlisted_card_matches_only_whole_words():
    from serve_app.domain.catalog import GPUClass, match_gpu_name

    l4 = GPUClass(id="l4", name="L4", compute_capability="8.9", architecture="Ada", vram_gib=24)
    assert match_gpu_name([l4], "NVIDIA L40 (engineering sample)") is None
    assert match_gpu_name([l4], "NVIDIA L4 (cloud)") is l4


def test_users_add_gpu_classes_and_variants_without_code():
    extension = {
        "gpus": [{"id": "rtx-6000-ada", "name": "RTX 6000 Ada", "compute_capability": "8.9",
                  "architecture": "Ada", "vram_gib": 48}],
        "variants": [{
            "id": "z-image-turbo-fp16", "task": "generate", "base_model": "z-image-turbo",
            "pipeline": "ZImagePipeline", "precision": "fp16", "source": {"local_path": "/models/zit"},
            "components": {"transformer": "z-image-transformer", "text_encoder": "qwen3-4b-text-encoder",
                           "vae": "flux-vae-16ch"},
            "defaults": {"num_inference_steps": 8, "guidance_scale": 0.0},
        }],
    }
    catalog = build_catalog(extension)
    assert catalog.gpu("RTX 6000 Ada").vram_gib == 48
    assert catalog.variant("z-image-turbo-fp16").transformer.params_b == pytest.approx(6.155)
    assert "z-image-turbo" in catalog.variants


def test_qwen_image_edit_2511_has_no_four_bit_variant(catalog):
    assert [v.id for v in catalog.variants.values()
            if v.base_model == "qwen-image-edit-2511" and v.precision in ("int4", "fp4")] == []
    bad = {"variants": [{
        "id": "qwen-image-edit-2511-int4", "task": "edit", "base_model": "qwen-image-edit-2511",
        "pipeline": "QwenImageEditPlusPipeline", "precision": "int4", "svdq_rank": 128, "requires_nunchaku": True,
        "max_input_images": 3, "source": {"hub_repo": "x/y", "transformer_file": "f.safetensors"},
        "components": {"transformer": "qwen-image-transformer", "text_encoder": "qwen2.5-vl-7b-encoder",
                       "vae": "qwen-image-vae"},
        "defaults": {"num_inference_steps": 4},
    }]}
    with pytest.raises(ValidationError, match="2511 has no 4-bit"):
        build_catalog(bad)


def test_variant_task_must_match_its_pipeline():
    bad = {"variants": [{
        "id": "wrong", "task": "edit", "base_model": "z-image-turbo", "pipeline": "ZImagePipeline",
        "precision": "bf16", "max_input_images": 1, "source": {"hub_repo": "x/y"},
        "components": {"transformer": "z-image-transformer", "text_encoder": "qwen3-4b-text-encoder",
                       "vae": "flux-vae-16ch"},
        "defaults": {"num_inference_steps": 8},
    }]}
    with pytest.raises(ValidationError, match="pipeline ZImagePipeline serves generate, not edit"):
        build_catalog(bad)


def test_variants_whose_scheduler_divides_by_zero_at_one_step_need_two(catalog):
    """The bf16 edit repositories' scheduler has shift_terminal; Lightning's overrides clear it."""
    assert catalog.variant("qwen-image-edit-2511").min_inference_steps == 2
    assert catalog.variant("qwen-image-edit-2509").min_inference_steps == 2
    assert catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step").min_inference_steps == 1
    assert catalog.variant("z-image-turbo").min_inference_steps == 1
