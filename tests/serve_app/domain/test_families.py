"""The pipeline families: every catalog variant names one, and what each record says is what the config rules
and the planner do with its variants."""

import pytest

from serve_app.domain.catalog import build_catalog, default_catalog
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.families import FAMILIES, family_of
from serve_app.domain.shapes import PROMPT_TOKENS, text_encoder_tokens

CATALOG = default_catalog()
# A bf16 variant of each family: what a config can ask each family for.
ONE_OF_EACH = {family: next(v for v in CATALOG.variants.values() if v.pipeline == family and v.precision == "bf16"
                            and not v.source.lora_file) for family in FAMILIES}


def test_every_catalog_variant_names_a_family_and_serves_its_tasks():
    assert {v.pipeline for v in CATALOG.variants.values()} == set(FAMILIES)
    for variant in CATALOG.variants.values():
        assert variant.tasks == FAMILIES[variant.pipeline].tasks
    assert CATALOG.variant("qwen-image-2.1").tasks == ("generate", "edit")
    with pytest.raises(ValueError, match="no pipeline family 'FluxPipeline'"):
        family_of("FluxPipeline")
    with pytest.raises(ValueError, match="no pipeline family 'FluxPipeline'"):
        build_catalog({"variants": [{
            "id": "flux", "base_model": "flux", "pipeline": "FluxPipeline", "precision": "bf16",
            "source": {"hub_repo": "x/y"}, "components": {"transformer": "z-image-transformer",
                                                          "text_encoder": "qwen3-4b-text-encoder",
                                                          "vae": "flux-vae-16ch"},
            "defaults": {"num_inference_steps": 8}}]})


def refused(variant_id: str, model: dict) -> bool:
    try:
        parse_config({"models": {variant_id: model}})
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("pipeline", FAMILIES)
def test_the_config_rules_refuse_what_the_family_record_says_it_cannot_do(pipeline):
    family, variant = FAMILIES[pipeline], ONE_OF_EACH[pipeline].id
    assert refused(variant, {"optimizations": {"step_cache": {"kind": "first_block"}}}) is not family.step_cache
    assert refused(variant, {"max_batch_size": 2}) is not family.batches_requests
    assert refused(variant, {"optimizations": {"attention_backend": "flash"}}) is family.masks_attention


@pytest.mark.parametrize("pipeline", FAMILIES)
def test_the_planner_sizes_the_text_encoder_and_cfg_by_the_family(pipeline):
    family, variant = FAMILIES[pipeline], ONE_OF_EACH[pipeline]
    if family.padded_text_tokens is not None:
        assert text_encoder_tokens(family, 2) == family.padded_text_tokens
    else:
        assert text_encoder_tokens(family, 2) == PROMPT_TOKENS + 2 * family.vision_tokens_per_input
    knob = {family.cfg_knob: 5.0}
    assert variant.runs_cfg(**knob, negative_prompt="blurry")
    assert not variant.runs_cfg(**{family.cfg_knob: 0.0}, negative_prompt="blurry")
