from pathlib import Path

import pytest
import yaml

from serve_app.builder import BuilderArgs, build_app, deployment_name, serve_options
from serve_app.config import ConfigError, parse_config

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


def test_serve_options_map_config_to_ray():
    config = parse_config({"device": {"device": "cuda"}, "models": {"z-image-turbo": {"deployment": {
        "resources": {"vram_ge_24": 0.01}, "label_selector": {"gpu-class": "rtx-4090"},
        "autoscaling": {"min_replicas": 0, "max_replicas": 3},
    }}}})
    options = serve_options(config.deployment_options("z-image-turbo"), config)
    assert options["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 1.0, "resources": {"vram_ge_24": 0.01},
                                            "label_selector": {"gpu-class": "rtx-4090"}}
    assert options["autoscaling_config"]["min_replicas"] == 0 and "num_replicas" not in options
    assert options["max_ongoing_requests"] == 4 and options["max_queued_requests"] == 32


def test_cpu_replicas_ask_for_no_gpu():
    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {}}})
    options = serve_options(config.deployment_options("z-image-turbo"), config)
    assert options["ray_actor_options"]["num_gpus"] == 0 and options["num_replicas"] == 1


def test_production_serve_config_validates_and_builds():
    serve_config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (application,) = serve_config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert (module, attr) == ("serve_app.builder", "build_app")
    config = BuilderArgs.model_validate(application["args"]).app_config()
    assert config.device.device == "cuda"
    assert [p.gpu_class for p in config.pools] == ["rtx-a4500", "rtx-4090", "a100-80g", "rtx-5090"]
    app = build_app(application["args"])
    assert type(app).__name__ == "Application"


def test_production_placement_keeps_80_gb_cards_for_what_needs_them():
    from serve_app.fleet import capacity_warnings, place

    (application,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    config = BuilderArgs.model_validate(application["args"]).app_config()
    placements, unplaced = place(config)
    assert unplaced == {}
    pools = {}
    for p in placements:
        pools.setdefault(p.variant.id, set()).add(p.pool.name)
    assert pools["qwen-image-edit-2511"] == {"a100"} and pools["qwen-image-edit-2509"] == {"a100"}
    assert pools["z-image-turbo-svdq-fp4-r32"] == {"rtx5090"}
    assert pools["qwen-image-edit-2509-svdq-int4-r128-lightning-4step"] == {"a4500", "rtx4090"}
    assert capacity_warnings(config, placements) == []


def test_deployment_names_are_stable():
    assert deployment_name("generate", "z-image-turbo") == "gen-z-image-turbo"
    assert deployment_name("edit", "qwen-image-edit-2511", "a100-80g") == "edit-qwen-image-edit-2511@a100-80g"
