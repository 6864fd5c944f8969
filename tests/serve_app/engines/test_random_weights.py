"""The random-weight builders: tiny for tests, full-size (docs/facts.md's architecture) for GPU benchmarks."""

import pytest
import torch

from serve_app.engines.random_weights import qwen_image_edit_pipeline, random_weight_pipeline, z_image_pipeline


def billions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


@pytest.mark.parametrize("variant_id", ["z-image-turbo", "qwen-image-edit-2509", "qwen-image-edit-2511"])
def test_full_size_builders_have_the_catalogs_parameter_counts(catalog, variant_id):
    variant = catalog.variant(variant_id)
    with torch.device("meta"):  # no memory: only shapes
        pipe = (z_image_pipeline("full") if variant.pipeline == "ZImagePipeline"
                else qwen_image_edit_pipeline("full", zero_cond_t=variant_id.endswith("2511")))
    for role, component in variant.components.items():
        assert billions(getattr(pipe, role)) == pytest.approx(component.params_b, abs=0.0005), role


def test_the_2511_flavour_sets_zero_cond_t():
    with torch.device("meta"):
        assert qwen_image_edit_pipeline("full", zero_cond_t=True).transformer.config.zero_cond_t is True


def test_random_weight_pipelines_refuse_4bit_variants():
    with pytest.raises(ValueError, match="4-bit needs nunchaku"):
        random_weight_pipeline("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", "tiny", "cpu", torch.float32)


def test_random_weight_pipeline_builds_in_the_asked_dtype_and_restores_the_default():
    pipe = random_weight_pipeline("z-image-turbo", "tiny", "cpu", torch.bfloat16)
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
