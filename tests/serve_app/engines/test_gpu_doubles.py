"""The GPU test doubles stand in for one thing each and otherwise run the real engine."""

import pytest
import torch

from serve_app.domain.config import parse_config
from serve_app.domain.images import image_size
from serve_app.domain.schemas import GenerateRequest
from serve_app.domain.specs import engine_spec
from serve_app.engines.gpu_doubles import (
    CUDA_FAULT_TRIGGER,
    OOM_TRIGGER,
    cuda_fault_loader,
    load_without_nunchaku,
    out_of_memory_loader,
)
from serve_app.engines.protocol import ImageEngine, Job

LIGHTNING = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"


def spec_for(tiny_models, variant_id, catalog):
    variant = catalog.variant(variant_id)
    config = parse_config({"device": {"device": "cpu"},
                           "models": {variant_id: {"source": str(tiny_models[variant.base_model])}}})
    return engine_spec(config, variant, catalog)


def job(prompt):
    return Job(GenerateRequest(prompt=prompt, seed=1), 64, 64, 1)


def test_out_of_memory_double_fails_the_trigger_prompt_only(tiny_models, catalog):
    engine = out_of_memory_loader(0)(spec_for(tiny_models, "z-image-turbo", catalog))
    assert isinstance(engine, ImageEngine)
    with pytest.raises(torch.OutOfMemoryError, match="test double"):
        engine.run([job(OOM_TRIGGER)], should_stop=lambda: False)
    (result,) = engine.run([job("fine")], should_stop=lambda: False)
    assert image_size(result.images[0]) == (64, 64)


def test_cuda_fault_double_fails_the_whole_batch_of_the_trigger_prompt(tiny_models, catalog):
    engine = cuda_fault_loader()(spec_for(tiny_models, "z-image-turbo", catalog))
    with pytest.raises(RuntimeError, match="CUDA error"):
        engine.run([job("fine"), job(CUDA_FAULT_TRIGGER)], should_stop=lambda: False)


def test_without_nunchaku_a_4bit_variant_keeps_its_scheduler_and_defaults(tiny_models, catalog):
    engine = load_without_nunchaku(spec_for(tiny_models, LIGHTNING, catalog))
    assert engine.variant.defaults.num_inference_steps == 4
    assert engine.pipe.scheduler.config.time_shift_type == "exponential"
    assert engine.info.device == "cpu"
