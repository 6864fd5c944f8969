import pytest

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.config_files import load_config


def write(tmp_path, text):
    path = tmp_path / "imageserve.yaml"
    path.write_text(text)
    return path


def test_planning_document_keys_keep_their_meaning(tmp_path):
    config = load_config(write(tmp_path, """
device:
  enable_cpu_offload: true
models:
  z-image-turbo:
    torch_dtype: float16
    source: ./weights/zit
"""))
    assert config.offload_mode_for("z-image-turbo") == "model"
    assert config.models["z-image-turbo"].torch_dtype == "float16"
    # relative paths resolve against the config file's folder
    assert config.models["z-image-turbo"].source == str((tmp_path / "weights" / "zit").resolve())


def test_offload_mode_beats_the_legacy_flag_and_models_override_both():
    config = parse_config({
        "device": {"enable_cpu_offload": True, "offload_mode": "sequential"},
        "models": {"z-image-turbo": {}, "qwen-image-edit-2509": {"offload_mode": "none"}},
    })
    assert config.offload_mode_for("z-image-turbo") == "sequential"
    assert config.offload_mode_for("qwen-image-edit-2509") == "none"
    assert parse_config({"models": {"z-image-turbo": {}}}).offload_mode_for("z-image-turbo") is None


def test_unknown_key_is_an_error_that_names_it_and_lists_the_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "device:\n  enable_cpu_ofload: true\n"))
    message = str(err.value)
    assert "device.enable_cpu_ofload: unknown key" in message
    assert "enable_cpu_offload" in message and "offload_mode" in message


def test_unknown_key_inside_a_model_lists_model_keys():
    with pytest.raises(ConfigError, match=r"models\.z-image-turbo\.dtype: unknown key; allowed here: .*torch_dtype"):
        parse_config({"models": {"z-image-turbo": {"dtype": "bfloat16"}}})


def test_bad_dtype_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config({"models": {"z-image-turbo": {"torch_dtype": "bf16"}}})
    assert "models.z-image-turbo.torch_dtype" in str(err.value)
    assert "'bfloat16', 'float16' or 'float32'" in str(err.value)
    assert "got 'bf16'" in str(err.value)


def test_unknown_model_id_lists_the_catalog():
    with pytest.raises(ConfigError, match="unknown variant.*'sdxl'.*known: .*qwen-image-edit-2511"):
        parse_config({"models": {"sdxl": {}}})


def test_load_lists_which_models_to_load():
    config = parse_config({
        "models": {"z-image-turbo": {}, "qwen-image-edit-2509": {}, "qwen-image-edit-2511": {"enabled": False}},
        "load": ["qwen-image-edit-2509"],
    })
    assert config.models_to_load() == ["qwen-image-edit-2509"]
    with pytest.raises(ConfigError, match="load: .*not configured"):
        parse_config({"models": {"z-image-turbo": {}}, "load": ["qwen-image-edit-2509"]})


def test_catalog_extension_is_validated():
    with pytest.raises(ConfigError, match="catalog"):
        parse_config({"catalog": {"gpus": [{"id": "x", "name": "X", "compute_capability": "eight",
                                            "architecture": "?", "vram_gib": 8}]}})
    config = parse_config({"catalog": {"gpus": [{"id": "rtx-6000-ada", "name": "RTX 6000 Ada",
                                                 "compute_capability": "8.9", "architecture": "Ada",
                                                 "vram_gib": 48}]}})
    assert config.build_catalog().gpu("rtx-6000-ada").four_bit == "int4"


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_a_serve_config_file_is_read_as_its_imageserve_config(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    config = load_config(root / "serve_config.yaml")
    assert config.device.device == "cuda" and [p.name for p in config.pools] == ["a4500", "rtx4090", "a100", "rtx5090"]
    other = tmp_path / "serve.yaml"
    other.write_text("applications: [{name: x, import_path: other.module:app}]\n")
    with pytest.raises(ConfigError, match="no application with import_path serve_app.builder:build_app"):
        load_config(other)


def test_a_maskless_attention_backend_is_refused_where_the_pipeline_masks():
    with pytest.raises(ConfigError, match=r"task=generate with attention=maskless \('flash'\): maskless kernels .* "
                                          "take no attention mask, and ZImagePipeline masks"):
        parse_config({"models": {"z-image-turbo": {"optimizations": {"attention_backend": "flash"}}}})
    with pytest.raises(ConfigError, match=r"attention=maskless \('_native_flash'\)"):
        parse_config({"models": {"z-image-turbo-svdq-int4-r128": {
            "optimizations": {"attention_backend": "_native_flash"}}}})
    # One prompt per call and no mask: the edit pipeline may use them; masked fused kernels are fine everywhere.
    parse_config({"models": {"qwen-image-edit-2511": {"optimizations": {"attention_backend": "flash"}}}})
    parse_config({"models": {"z-image-turbo": {"optimizations": {"attention_backend": "_native_cudnn"}}}})


def test_compiling_a_nunchaku_transformer_is_refused():
    with pytest.raises(ConfigError, match="precision=nunchaku-4bit with compile=on: nunchaku's 4-bit "
                                          "transformer runs custom CUDA kernels"):
        parse_config({"models": {"qwen-image-edit-2509-svdq-int4-r128-lightning-4step": {
            "optimizations": {"compile_transformer": True}}}})
    parse_config({"models": {"z-image-turbo": {"optimizations": {"compile_transformer": True}}}})


def test_pins_apply_to_the_catalogs_repo_and_can_be_required(tiny_models):
    commit, other = "1" * 40, "2" * 40
    config = parse_config({"models": {
        "z-image-turbo-svdq-int4-r128": {"revision": commit, "transformer_revision": other},
        "qwen-image-edit-2511": {"source": str(tiny_models["qwen-image-edit-2511"])},  # local: nothing to pin
    }})
    pipeline, transformer = config.weights("z-image-turbo-svdq-int4-r128")
    assert (pipeline.repo, pipeline.revision) == ("Tongyi-MAI/Z-Image-Turbo", commit)
    assert (transformer.repo, transformer.revision) == ("nunchaku-tech/nunchaku-z-image-turbo", other)
    assert config.weights("qwen-image-edit-2511")[0].repo is None

    with pytest.raises(ConfigError, match=r"models.z-image-turbo-svdq-int4-r128.transformer_revision must name"):
        parse_config({"hf": {"require_pinned_revisions": True},
                      "models": {"z-image-turbo-svdq-int4-r128": {"revision": commit}}})
    with pytest.raises(ConfigError, match="revision"):
        parse_config({"models": {"z-image-turbo": {"revision": "main"}}})  # a branch moves; only commits pin
