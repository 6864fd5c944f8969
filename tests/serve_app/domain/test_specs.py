"""The config resolved once into typed specs: one per deployment, each carrying only what it needs."""

import pickle

import pytest

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.specs import deployment_name, key_digest, resolve_application

POOLS = [{"name": "a4500", "gpu_class": "rtx-a4500"}, {"name": "a100", "gpu_class": "a100-80g"}]


def test_one_replica_spec_per_variant_and_pool_with_its_route():
    config = parse_config({"device": {"device": "cuda"}, "pools": POOLS,
                           "models": {"qwen-image-edit-2509-svdq-int4-r128-lightning-4step": {},
                                      "qwen-image-edit-2511": {"source": "/models/2511"}}})
    app = resolve_application(config)
    names = sorted(r.name for r in app.replicas)
    assert names == ["edit-qwen-image-edit-2509-svdq-int4-r128-lightning-4step@a100",
                     "edit-qwen-image-edit-2509-svdq-int4-r128-lightning-4step@a4500",
                     "edit-qwen-image-edit-2511@a100"]
    spec = next(r for r in app.replicas if r.name == "edit-qwen-image-edit-2511@a100")
    assert spec.tasks == ("edit",) and spec.uses_gpu
    assert (spec.pool.name, spec.pool.gpu.id, spec.pool.offload_mode) == ("a100", "a100-80g", "none")
    assert spec.engine.source == "/models/2511" and spec.engine.offload_modes == ("none", "model")
    assert spec.node_requirements == {"resources": {"gpu_class:a100-80g": 0.01}}
    routes = {r.deployment: r for r in app.router.routes}
    assert routes[spec.name].vram_gib == 79.6 and routes[spec.name].cost_s > 0
    assert app.unplaced == {}
    assert app.router.unavailable["z-image-turbo"].startswith("not configured")


def test_a_variant_that_fits_no_pool_is_unplaced_with_its_reason():
    config = parse_config({"pools": [POOLS[0]], "models": {"qwen-image-edit-2511": {}, "z-image-turbo": {}}})
    app = resolve_application(config)
    assert set(app.unplaced) == {"qwen-image-edit-2511"}
    assert app.router.unavailable["qwen-image-edit-2511"] == app.unplaced["qwen-image-edit-2511"]


def test_without_pools_the_device_decides_the_gpu():
    def uses_gpu(device, cluster_has_gpus):
        config = parse_config({"device": {"device": device}, "models": {"z-image-turbo": {}}})
        (spec,) = resolve_application(config, cluster_has_gpus=cluster_has_gpus).replicas
        return spec.uses_gpu

    assert uses_gpu("cuda", False) and not uses_gpu("cpu", True)
    assert uses_gpu("auto", True) and not uses_gpu("auto", False)


def test_specs_carry_batching_limits_and_http_settings():
    config = parse_config({"models": {"z-image-turbo": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02,
                                                        "torch_dtype": "float16"}},
                           "serving": {"api_keys": ["k"], "limits": {"max_body_mb": 2, "max_input_pixels": 4096}}})
    app = resolve_application(config)
    (spec,) = app.replicas
    assert (spec.batching.max_batch_size, spec.batching.wait_s) == (4, 0.02)
    assert spec.engine.batch_size == 4 and spec.engine.torch_dtype == "float16"
    assert spec.engine.max_input_pixels == 4096 and app.router.max_input_pixels == 4096
    assert app.router.http.api_key_sha256 == (key_digest("k"),) and app.router.http.max_body_bytes == 2_000_000


def test_inline_keys_reach_no_deployment_only_their_digests_reach_the_router():
    secret = "sk-inline-8c2f0d1e"
    config = parse_config({"models": {"z-image-turbo": {}, "qwen-image-edit-2511": {}},
                           "serving": {"api_keys": [secret], "api_key_sha256": [key_digest("other")]}})
    app = resolve_application(config)
    # What Ray stores as init args: the router's spec and every replica's, serialized.
    for spec in (app.router, *app.replicas):
        assert secret not in spec.model_dump_json() and secret not in repr(spec)
    assert set(app.router.http.api_key_sha256) == {key_digest(secret), key_digest("other")}
    for spec in app.replicas:
        assert "api_key" not in spec.model_dump_json()


def test_specs_cross_process_boundaries_as_they_are():
    app = resolve_application(parse_config({"pools": POOLS, "models": {"z-image-turbo": {}}}))
    assert pickle.loads(pickle.dumps(app)) == app


def test_nothing_to_serve_is_a_config_error():
    with pytest.raises(ConfigError, match="no model to serve"):
        resolve_application(parse_config({"models": {}}))


def test_deployment_names_are_stable():
    from serve_app.domain.catalog import default_catalog

    catalog = default_catalog()
    assert deployment_name(catalog.variant("z-image-turbo")) == "gen-z-image-turbo"
    assert deployment_name(catalog.variant("qwen-image-edit-2511"), "a100-80g") == "edit-qwen-image-edit-2511@a100-80g"
