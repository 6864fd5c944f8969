"""Lightning variants: the base model with a LoRA fused at load, Lightning's scheduler, few steps, no CFG.
Loaded on CPU from the tiny checkpoints and tiny LoRAs built offline with peft."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.schemas import EditRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.protocol import Job, ModelLoadError
from serve_app.engines.random_weights import tiny_checkpoint, tiny_lora

LIGHTNING = ["qwen-image-edit-2511-lightning-4step", "qwen-image-edit-2511-lightning-8step",
             "qwen-image-edit-2509-lightning-4step"]


def lightning_engine(tiny_root, catalog, variant_id, **model):
    variant = catalog.variant(variant_id)
    config = parse_config({"device": {"device": "cpu"},
                           "models": {variant_id: {**tiny_model_config(tiny_root, variant), **model}}})
    return load_engine(engine_spec(config, variant, catalog))


@pytest.mark.parametrize("variant_id", LIGHTNING)
def test_a_lightning_variant_loads_fused_with_lightnings_scheduler_and_edits(tiny_root, catalog, png_bytes,
                                                                              variant_id):
    engine = lightning_engine(tiny_root, catalog, variant_id)
    variant = engine.variant
    assert not any("lora" in name for name, _ in engine.pipe.transformer.named_parameters())  # fused, then dropped
    assert engine.pipe.scheduler.config["time_shift_type"] == "exponential"
    assert engine.pipe.scheduler.config["shift_terminal"] is None
    steps = variant.steps_for()
    assert steps == variant.lightning_steps and not variant.runs_cfg()
    calls = []
    engine.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    (result,) = engine.run([Job(EditRequest(prompt="make it blue", images=[png_bytes], seed=1), 64, 64, steps)],
                           should_stop=lambda: False)
    assert len(calls) == steps  # no CFG: one transformer forward per step
    assert result.images[0].shape[:2] == (64, 64)


def test_the_fused_weights_are_the_base_weights_plus_the_loras_product(tiny_root, catalog):
    engine = lightning_engine(tiny_root, catalog, "qwen-image-edit-2511-lightning-4step")
    checkpoint = tiny_checkpoint(tiny_root, "qwen-image-edit-2511")
    base = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    lora = load_file(tiny_lora(tiny_root, "qwen-image-edit-2511"))
    name = "transformer_blocks.0.attn.to_q"
    down, up = lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"]
    expected = base[f"{name}.weight"].float() + up.float() @ down.float()  # alpha = rank: scale 1
    fused = dict(engine.pipe.transformer.named_parameters())[f"{name}.weight"].detach().float()
    assert not torch.allclose(fused, base[f"{name}.weight"].float())
    assert torch.allclose(fused, expected, atol=1e-5)


def test_a_missing_lora_file_is_a_clear_load_error(tiny_root, catalog, tmp_path):
    with pytest.raises(ModelLoadError, match="LoRA file .*gone.safetensors does not exist"):
        lightning_engine(tiny_root, catalog, "qwen-image-edit-2511-lightning-4step",
                         lora_source=str(tmp_path / "gone.safetensors"))


def test_pinned_revisions_cover_the_lora_repo():
    with pytest.raises(ConfigError, match="models.qwen-image-edit-2511-lightning-4step.lora_revision"):
        parse_config({"hf": {"require_pinned_revisions": True},
                      "models": {"qwen-image-edit-2511-lightning-4step": {"revision": "a" * 40}}})


def test_a_lora_on_a_nunchaku_variant_is_refused(catalog):
    from serve_app.domain.catalog import build_catalog

    int4 = catalog.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step").model_dump(mode="json")
    int4["id"] = "mine"
    int4["source"].update({"lora_repo": "me/lora", "lora_file": "l.safetensors"})
    with pytest.raises(ValueError, match="nunchaku ships its Lightning builds fused already"):
        build_catalog({"variants": [int4]})
