"""Step caching through diffusers' hooks: fewer full transformer forwards, state reset between requests,
refused where diffusers 0.42 cannot cache."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import photo_png
from bench.step_cache import VARIANT, edit_once
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.schemas import EditRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.protocol import GenerationCancelled, Job

FIRST_BLOCK = {"kind": "first_block", "threshold": 0.4}


@pytest.mark.parametrize("cache", [FIRST_BLOCK, {"kind": "taylorseer", "cache_interval": 3}],
                         ids=["first_block", "taylorseer"])
def test_a_step_cache_skips_full_forwards_and_stays_close_to_the_plain_image(tiny_root, cache):
    png = photo_png()
    plain, full_plain, expected = edit_once(tiny_root, None, 12, png)
    cached, full_cached, _ = edit_once(tiny_root, cache, 12, png)
    assert full_plain == expected == 24  # 12 steps, each with and without the prompt (CFG)
    assert full_cached < full_plain
    assert np.abs(cached - plain).max() < 0.05


def test_the_cache_starts_afresh_for_every_request(tiny_root, catalog):
    """The pipeline resets the hooks' state after each call: a request's cached residuals never serve the next."""
    model = {**tiny_model_config(tiny_root, catalog.variant(VARIANT)), "optimizations": {"step_cache": FIRST_BLOCK}}
    config = parse_config({"device": {"device": "cpu"}, "models": {VARIANT: model}})
    engine = load_engine(engine_spec(config, catalog.variant(VARIANT), catalog))
    assert engine.pipe.transformer.is_cache_enabled
    request = EditRequest(prompt="make it blue", images=[photo_png()], seed=3, num_inference_steps=8,
                          negative_prompt="blurry", true_cfg_scale=4.0)
    first, second = (engine.run([Job(request, 64, 64, 8)], should_stop=lambda: False)[0] for _ in range(2))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


CACHES = pytest.mark.parametrize("cache", [FIRST_BLOCK, {"kind": "taylorseer", "cache_interval": 2,
                                                               "disable_cache_before_step": 2}],
                                 ids=["first_block", "taylorseer"])


def cached_engine(tiny_root, catalog, cache):
    model = {**tiny_model_config(tiny_root, catalog.variant(VARIANT)), "optimizations": {"step_cache": cache}}
    config = parse_config({"device": {"device": "cpu"}, "models": {VARIANT: model}})
    return load_engine(engine_spec(config, catalog.variant(VARIANT), catalog))


def edit_job(side: int, seed: int) -> Job:
    request = EditRequest(prompt="make it blue", images=[photo_png()], seed=seed, num_inference_steps=8,
                          negative_prompt="blurry", true_cfg_scale=4.0)
    return Job(request, side, side, 8)


@CACHES
def test_a_cancelled_call_leaves_no_cached_state_for_the_next_request(tiny_root, catalog, cache):
    """diffusers resets the hooks only at the end of a completed call: a call cancelled after 5 of 8 steps used
    to leave its residuals behind, and the next request of another size failed with a shape error."""
    engine = cached_engine(tiny_root, catalog, cache)
    steps = [0]

    def stop_after_five() -> bool:
        steps[0] += 1
        return steps[0] >= 5

    with pytest.raises(GenerationCancelled, match="stopped after 5 of 8 steps"):
        engine.run([edit_job(64, seed=1)], should_stop=stop_after_five)
    after = engine.run([edit_job(96, seed=2)], should_stop=lambda: False)[0].images[0]
    fresh = cached_engine(tiny_root, catalog, cache).run([edit_job(96, seed=2)], should_stop=lambda: False)
    np.testing.assert_array_equal(after, fresh[0].images[0])


@CACHES
def test_a_call_failing_mid_denoising_leaves_no_cached_state_for_the_next_request(tiny_root, catalog, cache):
    engine = cached_engine(tiny_root, catalog, cache)
    calls = [0]

    def fail_on_the_sixth_forward(*_):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("injected fault in the transformer")

    hook = engine.pipe.transformer.register_forward_pre_hook(fail_on_the_sixth_forward)
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.run([edit_job(64, seed=1)], should_stop=lambda: False)
    hook.remove()
    after = engine.run([edit_job(64, seed=2)], should_stop=lambda: False)[0].images[0]
    fresh = cached_engine(tiny_root, catalog, cache).run([edit_job(64, seed=2)], should_stop=lambda: False)
    np.testing.assert_array_equal(after, fresh[0].images[0])


@pytest.mark.parametrize(("variant", "reason"), [
    ("z-image-turbo", "ZImagePipeline has no step-cache support"),
    ("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", "nunchaku's 4-bit transformer"),
])
def test_a_step_cache_is_refused_where_diffusers_cannot_cache(variant, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_config({"models": {variant: {"optimizations": {"step_cache": FIRST_BLOCK}}}})
