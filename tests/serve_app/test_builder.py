from pathlib import Path

import pytest
import yaml

from deployments.model_replica import ModelReplica
from serve_app.builder import BuilderArgs, build_app
from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.specs import resolve_application

ROOT = Path(__file__).resolve().parents[2]


def test_builder_args_need_exactly_one_config_source():
    with pytest.raises(ConfigError, match="exactly one of `config`"):
        build_app({})
    with pytest.raises(ConfigError, match="exactly one of"):
        build_app({"config": {}, "config_path": "x.yaml"})
    with pytest.raises(ConfigError, match="confg: unknown key; allowed here: config, config_path"):
        build_app({"confg": {}})


def test_builder_reports_bad_inline_config_by_key():
    with pytest.raises(ConfigError, match=r"models\.z-image-turbo\.torch_dtype"):
        build_app({"config": {"models": {"z-image-turbo": {"torch_dtype": "int8"}}}})


def test_builder_refuses_an_empty_model_list():
    with pytest.raises(ConfigError, match="no model to serve"):
        build_app({"config": {"models": {}}})


def replica_options(config_data):
    (spec,) = resolve_application(parse_config(config_data)).replicas
    return ModelReplica.serve_options(spec)


def test_serve_options_map_config_to_ray():
    options = replica_options({"device": {"device": "cuda"}, "models": {"z-image-turbo": {"deployment": {
        "resources": {"vram_ge_24": 0.01}, "label_selector": {"gpu-class": "rtx-4090"},
        "autoscaling": {"min_replicas": 0, "max_replicas": 3},
    }}}})
    assert options["name"] == "gen-z-image-turbo"
    assert options["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 1.0, "resources": {"vram_ge_24": 0.01},
                                            "label_selector": {"gpu-class": "rtx-4090"}}
    assert options["autoscaling_config"]["min_replicas"] == 0 and "num_replicas" not in options
    assert options["max_ongoing_requests"] == 4 and options["max_queued_requests"] == 32


def test_cpu_replicas_ask_for_no_gpu():
    options = replica_options({"device": {"device": "cpu"}, "models": {"z-image-turbo": {}}})
    assert options["ray_actor_options"]["num_gpus"] == 0 and options["num_replicas"] == 1


def test_pool_replicas_are_pinned_to_their_pools_nodes():
    options = replica_options({"pools": [{"name": "rtx4090", "gpu_class": "rtx-4090"}],
                               "models": {"z-image-turbo": {}}})
    assert options["name"] == "gen-z-image-turbo@rtx4090"
    assert options["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 1.0,
                                            "resources": {"gpu_class:rtx-4090": 0.01}}


def production_config():
    (application,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    return application


def test_production_serve_config_validates_and_builds():
    application = production_config()
    module, _, attr = application["import_path"].partition(":")
    assert (module, attr) == ("serve_app.builder", "build_app")
    config = BuilderArgs.model_validate(application["args"]).app_config()
    assert config.device.device == "cuda"
    assert [p.gpu_class for p in config.pools] == ["rtx-a4500", "rtx-4090", "a100-80g", "rtx-5090"]
    app = build_app(application["args"])
    assert type(app).__name__ == "Application"


def test_production_placement_keeps_80_gb_cards_for_what_needs_them():
    from serve_app.domain.config_files import load_fleet
    from serve_app.domain.placement import capacity_warnings, place
    from serve_app.examples import EXAMPLE_FLEET

    config = BuilderArgs.model_validate(production_config()["args"]).app_config()
    placements, unplaced = place(config)
    assert unplaced == {}
    pools = {}
    for p in placements:
        pools.setdefault(p.variant.id, set()).add(p.pool.name)
    assert pools["qwen-image-edit-2511"] == {"a100"} and pools["qwen-image-edit-2509"] == {"a100"}
    assert pools["z-image-turbo-svdq-fp4-r32"] == {"rtx5090"}
    assert pools["qwen-image-edit-2509-svdq-int4-r128-lightning-4step"] == {"a4500", "rtx4090"}
    assert capacity_warnings(config, load_fleet(EXAMPLE_FLEET), placements) == []
