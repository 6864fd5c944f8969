from serve_app.config import parse_config
from serve_app.fleet import capacity_warnings, node_labels, node_resources, place, pool_requirements

ALL = ["z-image-turbo", "z-image-turbo-svdq-int4-r128", "z-image-turbo-svdq-fp4-r32", "qwen-image-edit-2509",
       "qwen-image-edit-2511", "qwen-image-edit-2509-svdq-int4-r128-lightning-4step",
       "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step"]
POOLS = [{"name": "a4500", "gpu_class": "rtx-a4500"}, {"name": "rtx4090", "gpu_class": "rtx-4090"},
         {"name": "a100", "gpu_class": "a100-80g"}, {"name": "rtx5090", "gpu_class": "rtx-5090"}]


def fleet_config(**extra):
    return parse_config({"models": {m: {} for m in ALL}, "pools": POOLS, **extra})


def placed(config):
    placements, unplaced = place(config)
    return {(p.variant.id, p.pool.name): p.plan.mode for p in placements}, unplaced


def test_placement_follows_vram_and_architecture():
    where, unplaced = placed(fleet_config())
    assert unplaced == {}
    pools_of = lambda v: {pool for (variant, pool) in where if variant == v}  # noqa: E731
    assert pools_of("z-image-turbo-svdq-fp4-r32") == {"rtx5090"}
    assert pools_of("qwen-image-edit-2509-svdq-fp4-r32-lightning-8step") == {"rtx5090"}
    assert pools_of("qwen-image-edit-2511") == {"a100"}
    assert pools_of("qwen-image-edit-2509") == {"a100"}
    assert pools_of("qwen-image-edit-2509-svdq-int4-r128-lightning-4step") == {"a4500", "rtx4090", "a100"}
    assert where[("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", "a4500")] == "model"
    assert where[("z-image-turbo", "rtx4090")] == "none"


def test_sequential_offload_needs_the_pool_to_allow_it():
    pools = [{"name": "rtx4090", "gpu_class": "rtx-4090", "max_offload_mode": "sequential"}]
    where, _ = placed(parse_config({"models": {"qwen-image-edit-2511": {}}, "pools": pools}))
    assert where == {("qwen-image-edit-2511", "rtx4090"): "sequential"}


def test_a_variant_that_fits_nowhere_is_reported_with_reasons():
    config = parse_config({"models": {"qwen-image-edit-2511": {}, "z-image-turbo": {}},
                           "pools": [{"name": "a4500", "gpu_class": "rtx-a4500"}]})
    _, unplaced = placed(config)
    assert set(unplaced) == {"qwen-image-edit-2511"}
    assert "fits no GPU pool" in unplaced["qwen-image-edit-2511"] and "a4500" in unplaced["qwen-image-edit-2511"]


def test_pool_variant_allow_list():
    pools = [dict(POOLS[2], variants=["qwen-image-edit-2511"])]
    where, unplaced = placed(parse_config({"models": {"qwen-image-edit-2511": {}, "z-image-turbo": {}},
                                           "pools": pools}))
    assert list(where) == [("qwen-image-edit-2511", "a100")]
    assert "not in the pool's variant list" in unplaced["z-image-turbo"]


def test_node_markers_and_replica_requirements(catalog):
    gpu = catalog.gpu("rtx-4090")
    resources = node_resources(gpu, gpus_per_node=2)
    assert resources["gpu_class:rtx-4090"] == 2 and resources["vram_ge_24"] == 2 and resources["int4"] == 2
    assert "vram_ge_32" not in resources and "fp4" not in resources
    assert node_labels(catalog.gpu("rtx-5090")) == {"imageserve.io/gpu-class": "rtx-5090",
                                                    "imageserve.io/vram-gib": "32", "imageserve.io/sm": "120"}
    pool = fleet_config().pools[1]
    assert pool_requirements(pool, gpu) == {"resources": {"gpu_class:rtx-4090": 0.01}}


def test_capacity_warning_when_a_pool_cannot_hold_its_minimum_replicas():
    config = fleet_config()
    placements, _ = place(config)
    warnings = capacity_warnings(config, placements)
    assert any(w.startswith("pool a100: 5 variants need 5 GPUs") for w in warnings)


def test_replica_pool_check(catalog):
    from deployments.model_server import pool_mismatch

    assert pool_mismatch(catalog.gpu("rtx-4090"), catalog.gpu("rtx-4090")) is None
    assert pool_mismatch(catalog.gpu("rtx-4090"), catalog.gpu("l4")) is None  # same sm, 24 GiB
    why = pool_mismatch(catalog.gpu("a100-80g"), catalog.gpu("rtx-a4500"))
    assert "expects A100 80GB (sm_80, 80 GiB) but got RTX A4500 (sm_86, 20 GiB)" in why
    assert pool_mismatch(catalog.gpu("rtx-4090"), None) is None
