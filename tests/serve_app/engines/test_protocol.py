"""The engine protocol's typed failures: what a raw error of a pipeline call is, decided in one place."""

import pytest
import torch

from serve_app.engines.protocol import DeviceFault, EngineOutOfMemory, GenerationCancelled, engine_failure


@pytest.mark.parametrize("raw, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), EngineOutOfMemory),
    (RuntimeError("CUDA error: out of memory"), EngineOutOfMemory),  # nunchaku's words: no fault of the context
    (MemoryError("out of memory"), EngineOutOfMemory),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceFault),
    (RuntimeError("device-side assert triggered"), DeviceFault),
])
def test_a_raw_device_failure_is_typed(raw, kind):
    typed = engine_failure(raw)
    assert type(typed) is kind and str(raw) in str(typed)
    assert engine_failure(typed) is typed


@pytest.mark.parametrize("raw", [ValueError("bad shape"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                 GenerationCancelled("stopped after 2 of 4 steps")])
def test_anything_else_stays_what_it_is(raw):
    assert engine_failure(raw) is raw


def test_a_pipeline_call_that_runs_out_of_memory_raises_the_typed_error(tiny_models, load_engine_for):
    from serve_app.domain.config import parse_config
    from serve_app.domain.schemas import GenerateRequest
    from serve_app.engines.protocol import Job

    engine = load_engine_for(parse_config({"device": {"device": "cpu"}, "models": {
        "z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}}}), "z-image-turbo")
    transformer_forward = engine.pipe.transformer.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (TEST DOUBLE: raised in the transformer's forward)")

    engine.pipe.transformer.forward = out_of_memory
    try:
        with pytest.raises(EngineOutOfMemory, match="TEST DOUBLE"):
            engine.run([Job(GenerateRequest(prompt="x", seed=1), 64, 64, 1)], should_stop=lambda: False)
    finally:
        engine.pipe.transformer.forward = transformer_forward
    (result,) = engine.run([Job(GenerateRequest(prompt="x", seed=1), 64, 64, 1)], should_stop=lambda: False)
    assert result.images  # the engine serves on
