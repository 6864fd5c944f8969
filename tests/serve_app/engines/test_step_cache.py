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
from serve_app.engines.protocol import Job

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


@pytest.mark.parametrize(("variant", "reason"), [
    ("z-image-turbo", "ZImagePipeline has no step-cache support"),
    ("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", "nunchaku's 4-bit transformer"),
])
def test_a_step_cache_is_refused_where_diffusers_cannot_cache(variant, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_config({"models": {variant: {"optimizations": {"step_cache": FIRST_BLOCK}}}})
