import pytest

from serve_app.domain.config import ConfigError, parse_config, parse_fleet
from serve_app.domain.placement import capacity_warnings, node_labels, node_resources, place, pool_requirements

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
    # Resident, Z-Image-Turbo took 24.87 GiB on an RTX 5090 (docs/facts.md): a 24 GB card offloads.
    assert where[("z-image-turbo", "rtx4090")] == "model"


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
                                                    "imageserve.io/vram-gib": "31.84", "imageserve.io/sm": "120"}
    pool = fleet_config().pools[1]
    assert pool_requirements(pool, gpu) == {"resources": {"gpu_class:rtx-4090": 0.01}}


def test_capacity_warning_when_a_pool_cannot_hold_its_minimum_replicas():
    fleet = parse_fleet({"pools": [dict(pool, max_nodes=4, gpus_per_node=1) for pool in POOLS]})
    config = fleet.serve_with(parse_config({"models": {m: {} for m in ALL}}))
    placements, _ = place(config)
    warnings = capacity_warnings(config, fleet, placements)
    assert any(w.startswith("pool a100: 5 variants need 5 GPUs") for w in warnings)
    roomy = parse_fleet({"pools": [dict(pool, max_nodes=2, gpus_per_node=8) for pool in POOLS]})
    assert capacity_warnings(config, roomy, placements) == []


def test_a_fleet_gives_the_serving_config_its_pools_with_their_node_size_but_no_node_counts():
    """GPUs per node decide multi-GPU replicas, so the serving config keeps them; node counts are the autoscaler's."""
    fleet = parse_fleet({"pools": [{"name": "a100", "gpu_class": "a100-80g", "gpus_per_node": 8, "max_nodes": 2,
                                    "variants": ["qwen-image-edit-2511"]}]})
    config = fleet.serve_with(parse_config({"models": {"qwen-image-edit-2511": {}}}))
    (pool,) = config.pools
    assert pool.model_dump(exclude_unset=True) == {"name": "a100", "gpu_class": "a100-80g", "gpus_per_node": 8,
                                                   "variants": ["qwen-image-edit-2511"]}
    assert (fleet.pool("a100").gpus_per_node, fleet.pool("a100").max_nodes, fleet.pool("a100").nodes) == (8, 2, 1)


def test_node_counts_belong_to_the_fleet_file_not_the_serving_config():
    with pytest.raises(ConfigError, match=r"pools\.0\.nodes: unknown key"):
        parse_config({"pools": [{"name": "a100", "gpu_class": "a100-80g", "nodes": 1}]})
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_fleet({"pools": [{"name": "a", "gpu_class": "l4"}, {"name": "a", "gpu_class": "l40s"}]})
    with pytest.raises(ConfigError, match="pools"):
        parse_fleet({})
