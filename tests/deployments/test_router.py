"""The router's request checks, on the specs the builder resolves (no Ray: the handles are never called)."""

import pytest

from deployments.router import Router
from serve_app.domain.config import parse_config
from serve_app.domain.errors import LimitExceededError, LoraNotFoundError, UnsupportedValueError
from serve_app.domain.schemas import EditRequest, GenerateRequest, LoraRequest
from serve_app.domain.specs import resolve_application


def router(limits: dict) -> Router:
    config = parse_config({"models": {"z-image-turbo": {}, "qwen-image-edit-2511": {}},
                           "serving": {"limits": limits}})
    spec = resolve_application(config).router
    unused_handles = {route.deployment: None for route in spec.routes}
    return Router(spec, unused_handles)


def test_a_request_over_the_cost_bound_is_422_naming_the_bound():
    checks = router({"max_request_cost": 100})
    z = checks.catalog.variant("z-image-turbo")
    checks.check_cost(GenerateRequest(prompt="x", num_inference_steps=8), z, (1024, 1024))  # ~8.4
    with pytest.raises(LimitExceededError) as err:
        checks.check_cost(GenerateRequest(prompt="x", n=4, num_inference_steps=50), z, (2048, 2048))
    assert err.value.param == "size" and "over this service's limit of 100" in err.value.message
    assert "839 megapixel-steps" in err.value.message


def test_input_images_count_in_the_cost_and_the_variants_default_steps_stand_in():
    checks = router({"max_request_cost": 200})
    edit = checks.catalog.variant("qwen-image-edit-2511")  # 40 default steps, CFG by default
    one = EditRequest(prompt="x", images=[b"a"])
    three = EditRequest(prompt="x", images=[b"a", b"b", b"c"])
    assert one.cost(1024, 1024, 40) == pytest.approx(1.048576 * 40 * 2)
    assert checks.check_cost(one, edit, (1024, 1024)) == pytest.approx(1.048576 * 40 * 2 * 2)
    with pytest.raises(LimitExceededError, match=r"x 40 steps x n=1 x \(1 \+ 3 input images\) x 2 for "
                                                 "classifier-free guidance"):
        checks.check_cost(three, edit, (1024, 1024))


def test_classifier_free_guidance_doubles_the_cost_where_the_pipeline_runs_it():
    """CFG runs two transformer forwards a step: a quota unit must not buy twice the GPU time."""
    checks = router({"max_request_cost": None})
    z, edit = checks.catalog.variant("z-image-turbo"), checks.catalog.variant("qwen-image-edit-2511")
    plain = checks.check_cost(GenerateRequest(prompt="x", num_inference_steps=8), z, (1024, 1024))
    guided = checks.check_cost(GenerateRequest(prompt="x", num_inference_steps=8, guidance_scale=3.0), z,
                               (1024, 1024))
    assert guided == pytest.approx(2 * plain)
    image = [b"a"]
    default = checks.check_cost(EditRequest(prompt="x", images=image, num_inference_steps=8), edit, (1024, 1024))
    no_cfg = checks.check_cost(EditRequest(prompt="x", images=image, num_inference_steps=8, true_cfg_scale=1.0),
                               edit, (1024, 1024))
    assert default == pytest.approx(2 * no_cfg)
    lightning = checks.catalog.variant("qwen-image-edit-2511-lightning-4step")  # distilled without CFG
    assert checks.check_cost(EditRequest(prompt="x", images=image, num_inference_steps=8), lightning,
                             (1024, 1024)) == pytest.approx(no_cfg)


def test_the_batch_fit_check_plans_with_classifier_free_guidance():
    """Z-Image stacks the unconditional pass into the batch: n=10 at 1024x1024 fits an RTX 4090 without CFG
    (19.7 GiB planned) and not with it (26.6 GiB against 22.7 usable)."""
    config = parse_config({"models": {"z-image-turbo": {}}, "pools": [{"name": "r4090", "gpu_class": "rtx-4090"}]})
    spec = resolve_application(config).router
    checks = Router(spec, {route.deployment: None for route in spec.routes})
    variants = [checks.catalog.variant("z-image-turbo")]
    checks.check_batch_fits(GenerateRequest(prompt="x", n=10), variants, (1024, 1024))
    with pytest.raises(LimitExceededError, match="n=10 images at 1024x1024 do not fit") as refused:
        checks.check_batch_fits(GenerateRequest(prompt="x", n=10, guidance_scale=2.0), variants, (1024, 1024))
    assert refused.value.param == "n"


def test_a_lora_load_is_charged_at_the_rate_the_request_ran():
    """A hotswap or load takes GPU time the router cannot plan: the replica times it, and the key pays it after
    the answer, in the request's own megapixel-steps per second."""
    from deployments.router import lora_load_cost
    from serve_app.domain.quotas import KeyLimits, KeyQuotas
    from serve_app.domain.schemas import ImageResult

    def result(timings):
        return ImageResult(images=[], seeds=[], variant="z-image-turbo", width=64, height=64, num_inference_steps=2,
                           created=0, timings=timings)

    assert lora_load_cost(result({"total_s": 2.0}), cost=10.0) == 0.0
    assert lora_load_cost(result({"total_s": 3.0, "lora_load_s": 1.0}), cost=10.0) == pytest.approx(5.0)
    quotas = KeyQuotas(KeyLimits(cost_per_minute=60, burst_cost=100), clock=lambda: 0.0)
    quotas.admit("k", 10.0).release()
    quotas.charge("k", 5.0)
    assert quotas._keys["k"].tokens == pytest.approx(85.0)
    quotas.charge(None, 5.0)  # callers without a key are not metered

    checks = router({"per_key": {"cost_per_minute": 60, "burst_cost": 100}})
    checks.quotas.admit("k", 10.0).release()
    checks._answered("k", "generate", result({"total_s": 3.0, "lora_load_s": 1.0}), cost=10.0)
    assert checks.quotas._keys["k"].tokens == pytest.approx(100 - 10 - 5, abs=0.1)


def test_no_bound_when_the_config_says_null():
    checks = router({"max_request_cost": None})
    checks.check_cost(GenerateRequest(prompt="x", n=4, num_inference_steps=100), checks.catalog.variant(
        "z-image-turbo"), (2048, 2048))


def test_not_ready_is_a_503_naming_the_variants_without_a_running_replica(monkeypatch):
    import asyncio

    from serve_app.domain.errors import NotReadyError

    checks = router({})
    deployments = {route.variant: route.deployment for route in checks.spec.routes}
    running = {deployments["z-image-turbo"]: 1}
    # serve.status() stands in here
    monkeypatch.setattr(checks, "_read_replica_states", lambda: {d: {"RUNNING": n} for d, n in running.items()})
    with pytest.raises(NotReadyError) as err:
        asyncio.run(checks.readiness())
    assert err.value.status_code == 503 and err.value.retry_after_s
    assert "qwen-image-edit-2511" in err.value.message and "z-image-turbo" not in err.value.message
    running[deployments["qwen-image-edit-2511"]] = 1
    checks.table.replicas = dict(running)  # what the background refresh reads next
    assert asyncio.run(checks.readiness()) == {"status": "ready",
                                               "replicas": {"qwen-image-edit-2511": 1, "z-image-turbo": 1}}


def test_models_and_readiness_do_not_ask_the_controller_on_every_request(monkeypatch):
    import asyncio

    import deployments.router as router_module
    from serve_app.domain.errors import NotReadyError

    monkeypatch.setattr(router_module, "REPLICA_COUNT_TTL_S", 3600)  # one background reading in this test
    checks = router({})
    reads = []
    monkeypatch.setattr(checks, "_read_replica_states", lambda: reads.append(1) or {})

    async def many_probes():
        for _ in range(20):
            await checks.models()
            try:
                await checks.readiness()
            except NotReadyError:  # no replica runs here
                pass
        checks._refresher.cancel()

    asyncio.run(many_probes())
    assert len(reads) <= 2  # the first call's reading and the background refresh's first: not 40


def test_pillows_own_bomb_limit_follows_the_configured_input_cap(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    router({"max_input_pixels": 1024 * 1024})
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024


def test_the_router_queue_is_bounded_and_past_it_callers_get_429_with_retry_after():
    from ray import serve

    from serve_app.openai_api.ingress import OpenAIIngress

    checks = router({"router_max_ongoing": 8, "router_max_queued": 4})
    options = Router.serve_options(checks.spec)
    assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 4
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}
    deployment = serve.deployment(OpenAIIngress).options(**options)  # what Serve itself accepts
    assert deployment.max_queued_requests == 4
    assert deployment.backpressure_config.status_code == 429


def test_each_router_replica_enforces_its_share_of_the_per_key_limits():
    config = parse_config({"models": {"z-image-turbo": {}}, "serving": {
        "router_replicas": 2, "limits": {"per_key": {"cost_per_minute": 100, "max_in_flight_requests": 4}}}})
    spec = resolve_application(config).router
    assert spec.key_limits.cost_per_minute == 100  # the spec holds the service's limits...
    checks = Router(spec, {route.deployment: None for route in spec.routes})
    assert checks.quotas.limits.cost_per_minute == 50 and checks.quotas.limits.max_in_flight_requests == 2


class RecordingHandle:
    """A deployment handle reduced to ``options``: records the options each route's handle was made with."""

    def __init__(self, **options) -> None:
        self.options_given = options

    def options(self, **options) -> "RecordingHandle":
        return RecordingHandle(**{**self.options_given, **options})


def test_routes_to_a_swap_group_name_their_variant_as_the_multiplexed_model_id():
    """Affinity: every call to a swap group carries its variant, so Serve prefers a replica that reported
    that variant on its GPU; a deployment of one variant gets plain calls."""
    config = parse_config({"models": {"z-image-turbo": {}, "qwen-image-edit-2509": {}, "qwen-image-edit-2511": {}},
                           "swap_groups": [{"name": "pair", "variants": ["z-image-turbo", "qwen-image-edit-2509"]}]})
    spec = resolve_application(config).router
    checks = Router(spec, {route.deployment: RecordingHandle() for route in spec.routes})
    given = {variant: [route.handle.options_given for route in routes]
             for variant, routes in checks.table.routes.items()}
    assert given == {"z-image-turbo": [{"multiplexed_model_id": "z-image-turbo"}],
                     "qwen-image-edit-2509": [{"multiplexed_model_id": "qwen-image-edit-2509"}],
                     "qwen-image-edit-2511": [{}]}
    assert {r.deployment for r in checks.table.routes["z-image-turbo"]} == {"swap-pair"}


def lora_router() -> Router:
    config = parse_config({
        "models": {"z-image-turbo": {}, "qwen-image-edit-2509": {}, "qwen-image-edit-2511": {}},
        "loras": {"ink": {"source": "/loras/ink.safetensors", "variants": ["z-image-turbo"]},
                  "sketch": {"source": "/loras/sketch.safetensors", "variants": ["qwen-image-edit-2511"]}}})
    spec = resolve_application(config).router
    return Router(spec, {route.deployment: RecordingHandle() for route in spec.routes})


def test_an_unlisted_lora_is_a_404_naming_the_list_and_a_misplaced_one_a_400():
    checks = lora_router()
    with pytest.raises(LoraNotFoundError, match=r"'oil' is not on this service's list \(ink, sketch\)") as err:
        checks._checked("generate", GenerateRequest(prompt="x", lora=LoraRequest(name="oil")))
    assert err.value.status_code == 404 and err.value.param == "lora"
    with pytest.raises(UnsupportedValueError, match="applies to qwen-image-edit-2511, not to z-image-turbo"):
        checks._checked("generate", GenerateRequest(prompt="x", lora=LoraRequest(name="sketch")))


def test_a_lora_narrows_an_alias_to_the_variants_that_take_it(png_bytes):
    checks = lora_router()
    request = EditRequest(prompt="x", images=[png_bytes], model="qwen-image-edit", lora=LoraRequest(name="sketch"))
    variants, _, _ = checks._checked("edit", request)
    assert [v.id for v in variants] == ["qwen-image-edit-2511"]


def test_a_request_with_a_lora_names_it_as_the_multiplexed_model_id():
    """Affinity: Serve sends it first to a replica that reported the LoRA loaded; plain requests are plain."""
    checks = lora_router()
    (route,) = checks.table.routes["z-image-turbo"]
    with_lora = checks._handle(route, GenerateRequest(prompt="x", lora=LoraRequest(name="ink", scale=0.5)))
    assert with_lora.options_given == {"multiplexed_model_id": "ink"}
    assert checks._handle(route, GenerateRequest(prompt="x", lora=LoraRequest(name="ink"))) is with_lora
    assert checks._handle(route, GenerateRequest(prompt="x")).options_given == {}


def test_models_lists_each_variants_loras():
    listed = lora_router()._static_model_info  # what /v1/models lists per variant, with its replicas
    assert listed["z-image-turbo"]["loras"] == ["ink"]
    assert listed["qwen-image-edit-2511"]["loras"] == ["sketch"]
    assert listed["qwen-image-edit-2509"]["loras"] == []


def test_models_lists_the_fp8_variants_with_the_gpus_they_fit():
    config = parse_config({"models": {"z-image-turbo-fp8": {}, "qwen-image-edit-2511-fp8": {}}})
    spec = resolve_application(config).router
    listed = Router(spec, {route.deployment: None for route in spec.routes})._static_model_info
    for variant_id in ("z-image-turbo-fp8", "qwen-image-edit-2511-fp8"):
        entry = listed[variant_id]
        fits = {g["gpu_class"] for g in entry["gpu_classes"]}
        assert entry["precision"] == "fp8"
        assert {"rtx-4090", "h100-sxm", "rtx-5090"} <= fits and not fits & {"a100-80g", "rtx-a4500", "rtx-3090"}


def test_model_cards_give_each_variants_size_range_and_the_size_their_vram_is_planned_at():
    import asyncio

    from serve_app.domain.planner import estimate_vram

    config = parse_config({"models": {"z-image-turbo": {}, "qwen-image-edit-2511": {}},
                           "defaults": {"width": 768, "height": 512}})
    spec = resolve_application(config).router
    checks = Router(spec, {route.deployment: None for route in spec.routes})
    cards = {card["id"]: card for card in asyncio.run(checks.models(internals=False))["data"]}
    for variant in checks.catalog.variants.values():
        card = cards[variant.id]
        # The side multiple is the pipeline family's: 16 (VAE 8 x patch 2), 32 for Qwen-Image-2.1 (VAE 16 x 2x2 merge).
        assert card["size_range"] == {"min_side": 64, "max_side": 2048, "multiple_of": variant.family.size_multiple}
        assert card["tasks"] == list(variant.tasks)
        assert card["default_size"] == "768x512"
        images = 1 if "edit" in variant.tasks else 0
        assert card["vram_planned_at"] == {"size": "768x512", "input_images": images}
        assert card["vram_gib"]["model"] == estimate_vram(variant, "model", 768, 512, images).peak_gib
        assert "pools" not in card and "replicas" not in card  # placement stays with internals

    plain = resolve_application(parse_config({"models": {"z-image-turbo": {}}})).router
    card = Router(plain, {route.deployment: None for route in plain.routes})._static_model_info["z-image-turbo"]
    assert (card["default_size"], card["vram_planned_at"]["size"]) == ("1024x1024", "1024x1024")
