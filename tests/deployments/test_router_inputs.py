"""The router's input images (issue 27): checked and decoded in its decode threads, never on the event loop;
a hostile one refused from its structure before it is admitted or charged; what they cost to decode charged
with the request; and the decoded pixels, re-encoded as a plain PNG, are what travels to the replica. No Ray:
the dispatch to a replica is replaced by a recorder."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

import deployments.router as router_module
from deployments.router import Router
from serve_app.domain.config import parse_config
from serve_app.domain.errors import BadImageError
from serve_app.domain.images import decode_image, inspect_image, sniff_format
from serve_app.domain.quotas import KeyLimits, KeyQuotas
from serve_app.domain.schemas import EditRequest, GenerateRequest, ImageResult
from serve_app.domain.specs import resolve_application
from tests.hostile_images import chunk_flood_png, encoded, scan_bomb_jpeg

BUCKET = 100.0


def recording_router(**limits) -> tuple[Router, list]:
    """A router whose dispatch records the request a replica would get, and whose per-key bucket (``BUCKET``
    megapixel-steps, refilled at a negligible rate on a clock that stands still) shows what was charged."""
    config = parse_config({"models": {"z-image-turbo": {}, "qwen-image-edit-2511": {}},
                           "serving": {"limits": limits}})
    spec = resolve_application(config).router
    router = Router(spec, {route.deployment: None for route in spec.routes})
    router.quotas = KeyQuotas(KeyLimits(cost_per_minute=1e-9, burst_cost=BUCKET), clock=lambda: 0.0)
    dispatched = []

    async def dispatch(variants, request, size, background=False):  # the events the route's replica would send
        dispatched.append(request)
        yield ImageResult(images=[], seeds=[], variant=variants[0].id, width=size[0], height=size[1],
                          num_inference_steps=2, created=0)

    router._dispatch = dispatch
    return router, dispatched


def edit(*images: bytes) -> EditRequest:
    return EditRequest(prompt="x", images=list(images), size="256x256", num_inference_steps=4)


def test_the_replica_gets_the_decoded_pixels_as_a_plain_png_not_the_callers_bytes():
    router, dispatched = recording_router()
    sideways = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the decoded image is upright
    Image.new("RGB", (40, 20), (200, 30, 30)).save(sideways, format="JPEG", exif=exif.tobytes())
    photo, webp = sideways.getvalue(), encoded("WEBP")
    asyncio.run(router.edit(edit(photo, webp), key_id="k"))
    (sent,) = dispatched
    assert len(sent.images) == 2 and all(sniff_format(data) == "PNG" for data in sent.images)
    for original, prepared in zip([photo, webp], sent.images, strict=True):
        assert np.array_equal(np.asarray(decode_image(prepared)), np.asarray(decode_image(original)))
    assert decode_image(sent.images[0]).size == (20, 40)


def test_images_are_checked_and_decoded_in_the_decode_threads_while_the_event_loop_answers_others(monkeypatch):
    """A decode held mid-way in its thread (an event stands in for a slow one): the event loop meanwhile
    answers a health probe, which it could not if the decode ran on it."""
    router, dispatched = recording_router()
    threads, started, release = [], threading.Event(), threading.Event()

    def held(work, hold: bool):
        def run(data, limits, name):
            threads.append(threading.current_thread().name)
            if hold:
                started.set()
                assert release.wait(60), "the test never released the decode"
            return work(data, limits, name)
        return run

    monkeypatch.setattr(router_module, "inspect_image", held(router_module.inspect_image, hold=False))
    monkeypatch.setattr(router_module, "prepare_input_image", held(router_module.prepare_input_image, hold=True))

    async def scenario():
        request = asyncio.create_task(router.edit(edit(encoded("PNG")), key_id="k"))
        assert await asyncio.to_thread(started.wait, 60), "the decode never started"
        health = await router.health()  # answered while the image is still being decoded
        assert not dispatched
        release.set()
        await request
        return health

    assert asyncio.run(scenario())["status"] == "ok"
    assert len(threads) == 2 and all(name.startswith("input-decode") for name in threads)
    assert len(dispatched) == 1


@pytest.mark.parametrize("hostile", [scan_bomb_jpeg(2000), chunk_flood_png(5000)], ids=["scan-bomb", "chunk-flood"])
def test_a_hostile_image_is_refused_before_it_is_admitted_or_charged(hostile):
    router, dispatched = recording_router()
    with pytest.raises(BadImageError, match="the limit") as err:
        asyncio.run(router.edit(edit(encoded("PNG"), hostile), key_id="k"))
    assert err.value.status_code == 400 and err.value.message.startswith("image 2 ")
    assert "k" not in router.quotas._keys  # never admitted: nothing charged, nothing in flight
    assert not dispatched


def test_an_image_that_passes_the_walk_but_will_not_decode_is_a_400_and_frees_its_admission():
    router, dispatched = recording_router()
    truncated = encoded("JPEG", (256, 256), progressive=True)[:-600]
    with pytest.raises(BadImageError, match="image 1 is truncated or corrupt"):
        asyncio.run(router.edit(edit(truncated), key_id="k"))
    assert router.quotas.in_flight("k") == (0, 0.0)
    assert not dispatched


def test_a_request_is_charged_what_its_inputs_cost_to_decode():
    router, _ = recording_router()
    large, progressive = encoded("PNG", (2048, 2048)), encoded("JPEG", (1024, 1024), progressive=True)
    request = edit(large, progressive)
    variant = router.catalog.variant("qwen-image-edit-2511")
    gpu_cost = router.check_cost(request, variant, (256, 256))
    decode_cost = sum(inspect_image(data).decode_cost for data in (large, progressive))
    assert decode_cost > 0.5  # a third of this small edit's cost (1.57, with CFG)
    asyncio.run(router.edit(request, key_id="k"))
    assert router.quotas._keys["k"].tokens == pytest.approx(BUCKET - gpu_cost - decode_cost)


def test_generation_has_no_inputs_to_decode_and_is_charged_as_before():
    router, dispatched = recording_router()
    request = GenerateRequest(prompt="x", size="256x256", num_inference_steps=2, seed=1)
    asyncio.run(router.generate(request, key_id="k"))
    gpu_cost = router.check_cost(request, router.catalog.variant("z-image-turbo"), (256, 256))
    assert router.quotas._keys["k"].tokens == pytest.approx(BUCKET - gpu_cost)
    assert dispatched == [request]  # nothing to decode: the request travels as it came (its seed given)


def test_the_router_draws_the_seed_once_so_a_retry_makes_the_same_image():
    router, dispatched = recording_router()
    asyncio.run(router.generate(GenerateRequest(prompt="x", size="64x64", num_inference_steps=2), key_id="k"))
    asyncio.run(router.generate(GenerateRequest(prompt="x", size="64x64", num_inference_steps=2, seed=5), key_id="k"))
    assert dispatched[0].seed is not None and dispatched[1].seed == 5


def test_steps_are_resolved_for_the_variant_the_route_serves():
    from serve_app.domain.catalog import default_catalog

    catalog = default_catalog()
    base, lightning = catalog.variant("qwen-image-edit-2511"), catalog.variant("qwen-image-edit-2511-lightning-4step")
    request = EditRequest(prompt="x", images=[b"png"], quality="low")
    assert Router.with_steps(request, base).num_inference_steps == base.defaults.quality_steps["low"]
    assert Router.with_steps(request, lightning).num_inference_steps == lightning.steps_for(None, "low")
    asked = EditRequest(prompt="x", images=[b"png"], num_inference_steps=3)
    assert Router.with_steps(asked, base) is asked  # the caller's own steps travel as they are
