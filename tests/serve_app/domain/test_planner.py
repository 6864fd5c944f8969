"""The planner's verdicts pinned to the facts of docs/facts.md."""

import pytest

from serve_app.domain.planner import estimate_vram, plan

SMALL_AND_MID_CARDS = ["rtx-4080", "rtx-a4500", "rtx-4000-ada", "rtx-4090", "rtx-3090", "l4", "rtx-5090",
                       "a100-40g", "l40s"]


@pytest.mark.parametrize("gpu", SMALL_AND_MID_CARDS)
@pytest.mark.parametrize("variant", ["qwen-image-edit-2509", "qwen-image-edit-2511"])
def test_bf16_edit_is_never_resident_on_16_to_48_gb_cards(catalog, gpu, variant):
    verdict = plan(catalog.variant(variant), catalog.gpu(gpu))
    assert verdict.mode != "none"
    assert verdict.estimates["none"].peak_gib > 48


@pytest.mark.parametrize("variant", ["qwen-image-edit-2509", "qwen-image-edit-2511"])
def test_bf16_edit_is_resident_on_80_gb_cards(catalog, variant):
    for gpu in ("a100-80g", "h100-sxm"):
        assert plan(catalog.variant(variant), catalog.gpu(gpu)).mode == "none"


def test_bf16_edit_transformer_alone_exceeds_24_gb(catalog):
    est = estimate_vram(catalog.variant("qwen-image-edit-2509"), "model", 1024, 1024, 1)
    assert est.peak_stage == "transformer" and est.weights_gib > 38


@pytest.mark.parametrize("gpu", ["rtx-a4500", "rtx-4000-ada", "rtx-4090", "rtx-3090", "a100-80g", "l40s", "h100-sxm"])
@pytest.mark.parametrize("variant", ["z-image-turbo-svdq-fp4-r32", "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step"])
def test_fp4_never_runs_below_sm_120(catalog, gpu, variant):
    verdict = plan(catalog.variant(variant), catalog.gpu(gpu))
    assert not verdict.fits
    assert "fp4 needs sm_120/121" in verdict.reason


def test_fp4_reason_names_the_card_and_its_sm(catalog):
    verdict = plan(catalog.variant("z-image-turbo-svdq-fp4-r32"), catalog.gpu("RTX 4000 Ada"))
    assert verdict.reason.startswith("fp4 needs sm_120/121; RTX 4000 Ada is sm_89")


@pytest.mark.parametrize("gpu", ["h100-sxm", "h200", "rtx-5090"])
@pytest.mark.parametrize("variant", ["z-image-turbo-svdq-int4-r128",
                                     "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"])
def test_int4_never_runs_on_hopper_or_blackwell(catalog, gpu, variant):
    verdict = plan(catalog.variant(variant), catalog.gpu(gpu))
    assert not verdict.fits and "int4 needs sm_75/80/86/89" in verdict.reason


def test_int4_refuses_sm_100_too(catalog):
    from serve_app.domain.catalog import GPUClass

    b200 = GPUClass(id="b200", name="B200", compute_capability="10.0", architecture="Blackwell", vram_gib=180)
    assert not plan(catalog.variant("z-image-turbo-svdq-int4-r128"), b200).fits


def test_fp4_runs_on_the_rtx_5090(catalog):
    verdict = plan(catalog.variant("qwen-image-edit-2509-svdq-fp4-r32-lightning-8step"), catalog.gpu("rtx-5090"))
    assert verdict.fits


def test_int4_lightning_edit_fits_a_20_gb_a4500_only_with_model_offload(catalog):
    variant = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    verdict = plan(variant, catalog.gpu("rtx-a4500"))
    assert verdict.fits and verdict.mode == "model"
    assert "none" in verdict.mode_reasons
    assert 16 <= verdict.peak_vram_gib <= 19.5  # docs/facts.md: ~17-19 GiB with model offload
    assert not plan(variant, catalog.gpu("rtx-a4500"), modes=("none",)).fits


@pytest.mark.parametrize("gpu", ["rtx-4090", "rtx-3090", "l4", "a10g"])
def test_z_image_bf16_is_not_resident_on_24_gb_cards(catalog, gpu):
    # Resident, it took 24.87 GiB on an RTX 5090 (docs/facts.md); with model offload 13.50 GiB.
    verdict = plan(catalog.variant("z-image-turbo"), catalog.gpu(gpu))
    assert verdict.mode == "model" and verdict.estimates["none"].peak_gib > catalog.gpu(gpu).vram_gib


def test_z_image_bf16_is_resident_on_the_rtx_5090(catalog):
    verdict = plan(catalog.variant("z-image-turbo"), catalog.gpu("rtx-5090"))
    assert verdict.mode == "none" and verdict.peak_vram_gib == pytest.approx(24.87, rel=0.10)


def test_z_image_bf16_needs_model_offload_on_16_and_20_gb_cards(catalog):
    for gpu in ("rtx-4080", "rtx-a4500"):
        verdict = plan(catalog.variant("z-image-turbo"), catalog.gpu(gpu))
        assert verdict.mode == "model" and 12 <= verdict.peak_vram_gib <= 15


def test_z_image_nunchaku_transformer_refuses_per_block_offload(catalog):
    verdict = plan(catalog.variant("z-image-turbo-svdq-int4-r128"), catalog.gpu("rtx-3070"), modes=("sequential",))
    assert not verdict.fits
    assert "no per-block offload" in verdict.reason


def test_recommended_mode_is_the_fastest_that_fits(catalog):
    variant = catalog.variant("qwen-image-edit-2509")
    assert plan(variant, catalog.gpu("a100-80g")).mode == "none"
    assert plan(variant, catalog.gpu("l40s")).mode == "model"
    assert plan(variant, catalog.gpu("rtx-4090")).mode == "sequential"


def test_bigger_requests_need_more_memory(catalog):
    variant = catalog.variant("qwen-image-edit-2511")
    # Each input image adds ~4k tokens to the transformer's sequence.
    one = estimate_vram(variant, "model", 1024, 1024, 1)
    three = estimate_vram(variant, "model", 1024, 1024, 3)
    assert three.stages["transformer"].activations_gib > one.stages["transformer"].activations_gib + 0.7
    assert one.peak_gib < three.peak_gib
    # A 4-megapixel output makes the VAE decode the peak.
    large = estimate_vram(variant, "none", 2048, 2048, 1)
    assert large.peak_stage == "vae" and large.peak_gib > estimate_vram(variant, "none", 1024, 1024, 1).peak_gib


def test_estimate_parts_add_up(catalog):
    est = estimate_vram(catalog.variant("z-image-turbo"), "none", 768, 768)
    assert est.source == "traced"
    assert est.peak_gib == pytest.approx(sum(part.gib for part in est.parts), abs=0.02)
    assert est.weights_gib == pytest.approx(19.1, abs=0.1)  # docs/facts.md: all resident 19.1 GiB
    assert {part.source for part in est.parts} == {"catalog", "traced", "fitted"}


def test_a_measured_call_is_planned_at_its_measurement(catalog):
    est = estimate_vram(catalog.variant("z-image-turbo"), "model", 1024, 1024)
    assert est.source == "measured" and est.peak_gib == 13.50
    assert est.peak_gib == pytest.approx(sum(part.gib for part in est.parts), abs=0.02)
    assert est.parts[-1].source == "measured" and "z-image-model-offload-rtx5090" in est.parts[-1].detail


def test_too_many_input_images_is_a_reason(catalog):
    verdict = plan(catalog.variant("qwen-image-edit-2509"), catalog.gpu("h100-sxm"), num_input_images=4)
    assert not verdict.fits and "at most 3 input images" in verdict.reason


def test_cfg_follows_each_pipelines_own_rule(catalog):
    """ZImagePipeline guides from guidance_scale > 0 (diffusers 0.42); the edit pipeline from
    true_cfg_scale > 1 with a negative prompt. A guided request costs two forwards per step."""
    from serve_app.domain.planner import estimate_seconds

    z = catalog.variant("z-image-turbo")
    assert not z.runs_cfg() and z.runs_cfg(guidance_scale=0.5) and z.runs_cfg(guidance_scale=3)
    edit = catalog.variant("qwen-image-edit-2511")
    assert edit.runs_cfg() and not edit.runs_cfg(true_cfg_scale=1.0)
    lightning = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    assert not lightning.runs_cfg() and lightning.runs_cfg(true_cfg_scale=4.0)
    guided = z.model_copy(update={"defaults": z.defaults.model_copy(update={"guidance_scale": 0.5})})
    gpu = catalog.gpu("h100-sxm")
    assert estimate_seconds(guided, gpu).forwards == 2 * estimate_seconds(z, gpu).forwards


# The cards docs/facts.md lists beyond the first catalog, each with sm, memory, TFLOPS and bandwidth.
MORE_CARDS = ["rtx-5080", "rtx-5070-ti", "rtx-5060-ti-16g", "rtx-4060-ti-16g", "rtx-4070-ti-super", "rtx-a6000",
              "rtx-6000-ada", "rtx-pro-6000", "a10", "a10g", "a40", "l40", "l20", "h100-pcie", "h20", "b200", "gb10",
              "t4", "rtx-2080-ti"]


@pytest.mark.parametrize("gpu", MORE_CARDS)
def test_the_catalog_has_the_cards_people_run(catalog, gpu):
    card = catalog.gpu(gpu)
    assert card.sm and card.vram_gib and card.memory_bandwidth_gbps and card.nvidia_smi_names
    assert card.bf16_tflops or gpu == "a10g"  # NVIDIA publishes no A10G figure (docs/facts.md)


def test_published_nvidia_smi_memory_is_what_the_planner_uses(catalog):
    # docs/facts.md: L4 23,034 MiB, L40S 46,068 MiB, RTX 5090 32,607 MiB, A10G ~23,028 MiB, PRO 6000 97,887 MiB.
    for gpu, mib in {"l4": 23034, "l40s": 46068, "rtx-5090": 32607, "a10g": 23028, "rtx-pro-6000": 97887}.items():
        card = catalog.gpu(gpu)
        assert card.vram_reported_by == "nvidia-smi" and card.vram_gib == pytest.approx(mib / 1024, abs=0.01)


def test_the_derivation_rule_reproduces_every_published_nvidia_smi_figure():
    """catalog.yaml derives unpublished figures as nominal GiB less ECC's 1/16 (data-center GDDR) or ~0.5%."""
    for nominal, ecc, mib in [(24, True, 23034), (48, True, 46068), (32, False, 32607), (96, False, 97887)]:
        derived = nominal * (15 / 16 if ecc else 0.995)
        assert derived == pytest.approx(mib / 1024, rel=0.002)


@pytest.mark.parametrize("gpu", ["t4", "rtx-2080-ti"])
def test_sm_75_cards_run_int4_only(catalog, gpu):
    card = catalog.gpu(gpu)
    assert "needs sm_80 or newer" in plan(catalog.variant("z-image-turbo"), card).reason
    assert "needs sm_80 or newer" in plan(catalog.variant("qwen-image-edit-2509"), card).reason
    assert plan(catalog.variant("z-image-turbo-svdq-int4-r128"), card).fits


def test_unified_memory_is_planned_resident_only(catalog):
    verdict = plan(catalog.variant("qwen-image-edit-2511"), catalog.gpu("gb10"))
    assert verdict.fits and verdict.mode == "none"
    forced = plan(catalog.variant("qwen-image-edit-2511"), catalog.gpu("gb10"), modes=("model",))
    assert not forced.fits and "shares one memory with the CPU" in forced.reason


def test_z_image_guidance_doubles_the_transformer_batch_and_qwen_guidance_does_not(catalog):
    z = catalog.variant("z-image-turbo")
    plain, guided = (estimate_vram(z, "model", 1024, 1024, cfg=cfg).stages["transformer"] for cfg in (False, True))
    assert guided.activations_gib == pytest.approx(2 * plain.activations_gib, rel=0.01)
    edit = catalog.variant("qwen-image-edit-2511")  # the second forward runs after the first
    plain, guided = (estimate_vram(edit, "model", 1024, 1024, 1, cfg=cfg).stages["transformer"]
                     for cfg in (False, True))
    assert guided.activations_gib == plain.activations_gib


def test_a_4bit_transformer_adds_its_own_buffers_to_the_bf16_modules_activations(catalog):
    bf16 = estimate_vram(catalog.variant("qwen-image-edit-2509"), "model", 1024, 1024, 1).stages["transformer"]
    int4 = estimate_vram(catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step"), "model", 1024, 1024,
                         1).stages["transformer"]
    assert 0 < int4.activations_gib - bf16.activations_gib < 0.2


def test_the_fp4_lightning_edit_is_not_resident_on_an_rtx_5090(catalog):
    # Qwen-Image's VAE decode measured 4.37 GiB allocated at 1024^2 (InvokeAI): resident, it does not fit.
    verdict = plan(catalog.variant("qwen-image-edit-2509-svdq-fp4-r32-lightning-8step"), catalog.gpu("rtx-5090"))
    assert verdict.mode == "model" and verdict.estimates["none"].peak_gib > catalog.gpu("rtx-5090").vram_gib


def test_time_follows_the_calibrated_efficiency_of_each_architecture(catalog):
    from serve_app.domain.planner import estimate_seconds

    z = catalog.variant("z-image-turbo")
    h100, rtx5090 = estimate_seconds(z, catalog.gpu("h100-sxm")), estimate_seconds(z, catalog.gpu("rtx-5090"))
    assert "sglang-z-image-h100" in h100.efficiency_source and "sglang-z-image-rtx5090" in rtx5090.efficiency_source
    # SGLang's baselines: ~84 ms per step on an H100, ~273 ms on an RTX 5090.
    assert h100.denoise_s / h100.forwards == pytest.approx(0.084, rel=0.05)
    assert rtx5090.denoise_s / rtx5090.forwards == pytest.approx(0.273, rel=0.05)
    # diffusers ran Qwen-Image-Edit-2511's 50 guided steps in 46.8 s of transformer time on an H100 (LightX2V).
    edit = estimate_seconds(catalog.variant("qwen-image-edit-2511"), catalog.gpu("h100-sxm"), num_inference_steps=50)
    assert edit.forwards == 100 and edit.denoise_s == pytest.approx(46.8, rel=0.05)
    a100 = estimate_seconds(catalog.variant("z-image-turbo-svdq-int4-r128"), catalog.gpu("a100-80g"))
    assert a100.four_bit_speedup == 1.0  # nunchaku#701: memory, not time, on an A100


@pytest.mark.parametrize("variant_id", ["z-image-turbo-fp8", "qwen-image-edit-2511-fp8"])
def test_fp8_variants_run_from_ada_on_and_never_on_ampere(catalog, variant_id):
    variant = catalog.variant(variant_id)
    for gpu_id in ("a100-80g", "rtx-a4500", "rtx-3090"):
        verdict = plan(variant, catalog.gpu(gpu_id), 1024, 1024)
        assert not verdict.fits and "has no fp8 tensor cores" in verdict.reason
    for gpu_id in ("rtx-4090", "h100-sxm", "b200", "rtx-5090"):
        assert plan(variant, catalog.gpu(gpu_id), 1024, 1024).fits, gpu_id


def test_an_fp8_transformer_weighs_about_half_its_bf16_one(catalog):
    bf16 = catalog.variant("qwen-image-edit-2511").transformer.weight_bytes("bf16")
    fp8 = catalog.variant("qwen-image-edit-2511-fp8").transformer.weight_bytes("bf16")
    assert 0.5 < fp8 / bf16 < 0.55
    # The fp8 edit model fits a 24 GB card with only the text encoder offloaded; bf16 needs sequential offload.
    assert plan(catalog.variant("qwen-image-edit-2511-fp8"), catalog.gpu("rtx-4090"), 1024, 1024).mode == "model"
    assert plan(catalog.variant("qwen-image-edit-2511"), catalog.gpu("rtx-4090"), 1024, 1024).mode == "sequential"
