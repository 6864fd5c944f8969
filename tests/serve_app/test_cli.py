"""The ``imageserve`` command, run from a folder outside the repository: its defaults are package data."""

import json
from pathlib import Path

import pytest
import yaml

from serve_app.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _away_from_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


def test_plan_prints_a_table_for_every_catalog_gpu(capsys, catalog):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["GPU", "VRAM", "sm", "variant"]
    for gpu in catalog.gpus.values():
        assert gpu.name in out
    assert "fp4 needs sm_120/121; RTX 4000 Ada is sm_89" in out


def test_plan_json_has_the_documented_fields(capsys, catalog):
    assert main(["plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(catalog.gpus) * len(catalog.variants)
    for row in rows:
        assert {"gpu", "variant", "fits", "mode", "peak_vram_gib", "reason"} <= set(row)
        assert isinstance(row["fits"], bool)
        assert row["mode"] in ("none", "model", "sequential", None)
        assert (row["reason"] is None) == row["fits"]
        assert (row["seconds_per_image"] is not None) == row["fits"]
    a4500 = next(r for r in rows if r["gpu"] == "rtx-a4500"
                 and r["variant"] == "qwen-image-edit-2509-svdq-int4-r128-lightning-4step")
    assert (a4500["fits"], a4500["mode"]) == (True, "model")


def test_plan_filters_and_request_shape(capsys):
    assert main(["plan", "--json", "--gpu", "RTX 4090", "--variant", "qwen-image-edit-2511",
                 "--images", "3", "--width", "768", "--height", "1344"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["gpu"], row["width"], row["height"], row["num_input_images"]) == ("rtx-4090", 768, 1344, 3)


def test_plan_gpu_auto_without_a_gpu_says_so(capsys):
    assert main(["plan", "--gpu", "auto"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_plan_unknown_gpu_is_a_usage_error(capsys):
    assert main(["plan", "--gpu", "voodoo"]) == 2
    assert "unknown GPU class 'voodoo'" in capsys.readouterr().err


def test_make_tiny_models_builds_loadable_folders(tmp_path, capsys):
    assert main(["make-tiny-models", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("z-image-turbo-tiny", "qwen-image-edit-2509-tiny", "qwen-image-edit-2511-tiny"):
        assert (tmp_path / name / "model_index.json").exists()
        assert name in out
    index = json.loads((tmp_path / "qwen-image-edit-2509-tiny" / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]


def test_doctor_reports_this_machine(capsys, tmp_path, monkeypatch):
    import serve_app.doctor

    monkeypatch.setattr(serve_app.doctor, "host_memory_gib", lambda: 512.0)  # room for any catalog variant on CPU
    code = main(["doctor", "--json", "--cache-dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"] is None  # the test machines have no GPU
    assert report["host_memory_gib"] == 512
    assert report["disk"]["download_needed_gb"] > 100  # the whole catalog: ~181 GB
    assert report["nunchaku"]["usable"] is False
    serves = {v["variant"]: v["serves"] for v in report["variants"]}
    assert serves["z-image-turbo"] is True and serves["z-image-turbo-svdq-int4-r128"] is False
    assert code == (0 if report["ok"] else 1)


def test_doctor_on_cpu_serves_only_what_fits_in_host_ram(capsys, tmp_path, monkeypatch):
    """A 20B bf16 edit model is 107 GiB of float32 weights on CPU: a 23.5 GiB machine cannot load it."""
    import serve_app.doctor

    monkeypatch.setattr(serve_app.doctor, "host_memory_gib", lambda: 64.0)
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  z-image-turbo: {}\n  qwen-image-edit-2511: {}\n  qwen-image-edit-2509:\n"
                      "    torch_dtype: bfloat16\n")
    main(["doctor", "--json", "--config", str(config), "--cache-dir", str(tmp_path)])
    verdicts = {v["variant"]: v for v in json.loads(capsys.readouterr().out)["variants"]}
    # z-image-turbo: 10.26B parameters x 4 bytes = 38.2 GiB, and the planner's 8 GiB host reserve.
    assert (verdicts["z-image-turbo"]["serves"], verdicts["z-image-turbo"]["host_ram_gib"]) == (True, 46.2)
    edit = verdicts["qwen-image-edit-2511"]
    assert (edit["serves"], edit["host_ram_gib"]) == (False, 115.5)
    assert edit["reason"] == ("on CPU its weights take 107.5 GiB and the host reserve 8 GiB, 115.5 GiB in all; this "
                              "machine has 64.0 GiB: serve it on a GPU node, or on a machine with more RAM")
    # The same weights in the bfloat16 the config asks for instead of CPU's float32: half.
    bf16 = verdicts["qwen-image-edit-2509"]
    assert (bf16["serves"], bf16["host_ram_gib"]) == (True, 61.7)

    monkeypatch.setattr(serve_app.doctor, "host_memory_gib", lambda: 23.5)
    main(["doctor", "--config", str(config), "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "  yes " not in out and "  no   z-image-turbo: on CPU its weights take 38.2 GiB" in out


def test_doctor_says_nothing_serves_where_the_config_asks_for_cuda_and_there_is_none(capsys, tmp_path, monkeypatch):
    import serve_app.doctor

    monkeypatch.setattr(serve_app.doctor, "host_memory_gib", lambda: 512.0)
    config = tmp_path / "config.yaml"
    config.write_text("device: {device: cuda}\nmodels:\n  z-image-turbo: {}\n")
    assert main(["doctor", "--config", str(config), "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "GPU:       none (CUDA not available), and the config says device: cuda: nothing serves here" in out
    assert ("  no   z-image-turbo: the config says device: cuda, and torch sees no CUDA GPU here: run on a GPU "
            "node, or set device: auto to run the bf16 variants on CPU") in out


def test_doctor_lists_the_combinations_a_config_cannot_run(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  z-image-turbo-svdq-int4-r128:\n    optimizations: {compile_transformer: true}\n"
                      "  qwen-image-edit-2511:\n    optimizations: {step_cache: {kind: taylorseer}}\n")
    code = main(["doctor", "--config", str(config), "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "Refused combinations" in out
    assert ("models.z-image-turbo-svdq-int4-r128 (optimizations.compile_transformer): precision=nunchaku-4bit with "
            "compile=on: nunchaku's 4-bit transformer runs custom CUDA kernels") in out
    assert "qwen-image-edit-2511" not in out.split("Refused combinations")[1]  # a step cache on an edit model runs


def test_doctor_counts_a_shared_repo_once():
    from serve_app.doctor import download_need_gb
    from serve_app.domain.catalog import default_catalog

    c = default_catalog()
    both = download_need_gb([c.variant("qwen-image-edit-2509"),
                             c.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")])
    assert both == 58 + 12.7
    only_int4 = download_need_gb([c.variant("qwen-image-edit-2509-svdq-int4-r128-lightning-4step")])
    assert only_int4 == 30


def test_plan_fleet_prints_the_placement(capsys):
    assert main(["plan", "--fleet", "--json"]) == 0  # no path: the example fleet
    report = json.loads(capsys.readouterr().out)
    pools = {}
    for row in report["placements"]:
        pools.setdefault(row["variant"], set()).add(row["pool"])
    assert pools["qwen-image-edit-2511"] == {"a100"}
    assert pools["z-image-turbo-svdq-fp4-r32"] == {"rtx5090"}
    assert report["unplaced"] == {}


def test_cluster_configs_from_anywhere_write_what_the_repository_holds(tmp_path, capsys):
    """By default the manifests go to cluster/deploy/, where docs/deploy.md's next steps (ray up, kubectl apply)
    read them; they used to land beside serve_config.yaml in the current folder."""
    assert main(["cluster-configs"]) == 0
    assert "wrote serve_config.yaml" in capsys.readouterr().out
    assert not (tmp_path / "ray-cluster.yaml").exists()
    written = {"serve_config.yaml": tmp_path / "serve_config.yaml",
               "cluster/deploy/ray-cluster.yaml": tmp_path / "cluster" / "deploy" / "ray-cluster.yaml",
               "cluster/deploy/kuberay-rayservice.yaml": tmp_path / "cluster" / "deploy" / "kuberay-rayservice.yaml"}
    for committed, path in written.items():
        assert yaml.safe_load(path.read_text()) == yaml.safe_load((ROOT / committed).read_text()), committed


def test_plan_explain_names_where_every_part_comes_from(capsys):
    assert main(["plan", "--gpu", "rtx-5090", "--variant", "z-image-turbo", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("z-image-turbo on RTX 5090 (31.84 GiB (nvidia-smi)")
    for source in ("[catalog]", "[traced]", "[fitted]", "[measured]"):
        assert source in out
    assert "flux-vae-16ch vae_decode at 1,048,576 px" in out and "z-image-resident-rtx5090" in out


def test_calibrate_reports_the_fit_and_its_residuals(capsys):
    assert main(["calibrate"]) == 0
    out = capsys.readouterr().out
    assert "reserve_fraction" in out and "z-image-resident-rtx5090" in out and "efficiency Hopper/bf16" in out


def test_plan_shows_how_a_swap_group_shares_each_gpu(capsys):
    assert main(["plan", "--config", str(ROOT / "examples" / "single-gpu.yaml"), "--gpu", "rtx-4090,a100-80g",
                 "--variant", "z-image-turbo-svdq-int4-r128"]) == 0
    out = capsys.readouterr().out
    assert "swap group single-gpu on RTX 4090 (22.69 GiB usable, host link 25.2 GB/s): one at a time" in out
    assert "swap group single-gpu on A100 80GB" in out and "all stay on the GPU, no swaps" in out
    assert "host RAM: 47 GiB needed of 64" in out


def test_run_serves_a_config_on_tiny_checkpoints_where_there_is_no_gpu(monkeypatch, tmp_path, capsys, tiny_root):
    """`imageserve run --config examples/single-gpu.yaml` on this CPU machine: the config as it would run, on
    the tiny checkpoints, 4-bit variants through the nunchaku test double (what reaches run_foreground)."""
    import serve_app.runner

    served = {}
    monkeypatch.setattr(serve_app.runner, "run_foreground",
                        lambda config, loaders=None, **_: served.update(config=config, loaders=loaders) or 0)
    assert main(["run", "--config", str(ROOT / "examples" / "single-gpu.yaml"), "--tiny-dir", str(tiny_root)]) == 0
    assert "from tiny random-weight checkpoints on CPU" in capsys.readouterr().out
    config = served["config"]
    assert config.device.device == "cpu" and config.pools == []
    assert [g.variants for g in config.swap_groups] == [["z-image-turbo-svdq-int4-r128",
                                                         "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"]]
    assert all(str(tiny_root) in m.source for m in config.models.values())
    assert set(served["loaders"]) == set(config.models)  # both are 4-bit: both load without nunchaku

    import serve_app.engines.hardware

    monkeypatch.setattr(serve_app.engines.hardware, "cuda_available", lambda: True)  # as on the GPU box
    assert main(["run", "--config", str(ROOT / "examples" / "single-gpu.yaml"), "--tiny", "never"]) == 0
    assert served["loaders"] is None and served["config"].swap_groups[0].host_ram_gib == 64


def test_run_on_tiny_checkpoints_keeps_the_speed_options_a_cpu_runs_and_says_what_it_left_out(
        monkeypatch, tmp_path, capsys, tiny_root):
    """A step cache used to vanish without a word on the way to CPU, so it could not even be tried there."""
    import serve_app.runner

    served = {}
    monkeypatch.setattr(serve_app.runner, "run_foreground",
                        lambda config, loaders=None, **_: served.update(config=config) or 0)
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n"
        "  qwen-image-edit-2511:\n"
        "    offload_mode: model\n"
        "    optimizations:\n"
        "      {step_cache: {kind: taylorseer}, attention_backend: _native_cudnn, vae_channels_last: true}\n"
        "  z-image-turbo:\n"
        "    optimizations: {attention_backend: _native_math, compile_transformer: true}\n")
    assert main(["run", "--config", str(config), "--tiny-dir", str(tiny_root)]) == 0
    out = capsys.readouterr().out
    edit = served["config"].models["qwen-image-edit-2511"].optimizations
    assert edit.step_cache.kind == "taylorseer" and edit.vae_channels_last and edit.attention_backend is None
    generate = served["config"].models["z-image-turbo"].optimizations
    assert generate.attention_backend == "_native_math" and generate.compile_transformer
    assert "left out on CPU: models.qwen-image-edit-2511.offload_mode" in out
    assert "left out on CPU: models.qwen-image-edit-2511.optimizations.attention_backend '_native_cudnn'" in out
    assert "z-image-turbo" not in "".join(line for line in out.splitlines() if "left out" in line)


def _no_ray(monkeypatch):
    import serve_app.runner

    monkeypatch.setattr(serve_app.runner, "run_foreground", lambda *_, **__: pytest.fail("Ray must not start"))


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_run_refuses_4bit_variants_without_a_gpu_in_one_line_before_ray_starts(monkeypatch, capsys):
    """It used to start Ray, load for a minute, and end in a traceback under three of the controller's."""
    _no_ray(monkeypatch)
    assert main(["run", "--config", str(ROOT / "examples" / "single-gpu.yaml"), "--tiny", "never"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "imageserve run: z-image-turbo-svdq-int4-r128 is a nunchaku 4-bit variant and needs a CUDA GPU; "
        "qwen-image-edit-2509-svdq-int4-r128-lightning-4step is a nunchaku 4-bit variant and needs a CUDA GPU: "
        "run it on a GPU node, or try it here on tiny random-weight checkpoints with --tiny auto")


def test_run_refuses_device_cuda_without_a_gpu_in_one_line(monkeypatch, capsys, tmp_path):
    _no_ray(monkeypatch)
    config = tmp_path / "config.yaml"
    config.write_text("device: {device: cuda}\nmodels: {z-image-turbo: {}}\n")
    assert main(["run", "--config", str(config), "--tiny", "never"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "imageserve run: the config says device: cuda, and torch sees no CUDA GPU here: run it on a GPU node, or try "
        "it here on tiny random-weight checkpoints with --tiny auto")


def test_run_refuses_a_key_file_it_cannot_read_or_that_holds_no_key(monkeypatch, capsys, caplog, tmp_path, tiny_root):
    """Either would start a service that answers every request 401."""
    _no_ray(monkeypatch)
    monkeypatch.delenv("IMAGESERVE_API_KEYS", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text("serving: {api_keys_file: keys}\n")
    assert main(["run", "--config", str(config), "--tiny-dir", str(tiny_root)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "imageserve run: serving.api_keys_file keys: the API key file cannot be read (FileNotFoundError: No such "
        "file or directory): write one key a line there, or leave serving.api_keys_file out (docs/security.md)")
    (tmp_path / "keys").write_text("# rotated out\n")
    assert main(["run", "--config", str(config), "--tiny-dir", str(tiny_root)]) == 2
    assert "hold no key, so every request would be refused" in _one_line(capsys.readouterr().err)
    assert caplog.records == []  # the key ring's own log lines would say the same again


def test_run_on_an_open_address_says_only_why_it_refuses(monkeypatch, capsys, caplog):
    """It used to warn that every route is open, then refuse to open them."""
    _no_ray(monkeypatch)
    monkeypatch.delenv("IMAGESERVE_API_KEYS", raising=False)
    assert main(["run", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 with no API keys" in _one_line(capsys.readouterr().err)
    assert "every route is open" not in caplog.text


def test_a_config_path_that_names_no_file_says_where_it_looked_and_what_to_give(capsys, tmp_path):
    from serve_app.examples import EXAMPLE_PRODUCTION_CONFIG

    assert main(["doctor", "--config", "production.yaml"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"imageserve: --config production.yaml: no such file at {tmp_path / 'production.yaml'}; the example "
        f"production.yaml is {EXAMPLE_PRODUCTION_CONFIG}")
    assert main(["plan", "--fleet", "fleets/big.yaml"]) == 2
    assert _one_line(capsys.readouterr().err).endswith("; give the path of an existing fleet file")


REPORTING = """
import json, os, subprocess, sys
from serve_app.cli import report_stream

with report_stream(True) as report:
    print("(raylet) a line of Ray's", flush=True)
    os.write(1, b"a write to descriptor 1\\n")
    subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
    print(json.dumps({"ok": 1}), file=report)
print("after the report")
"""


def test_report_stream_leaves_stdout_to_the_report_alone():
    """`cluster-sim --json`: Ray's processes inherit file descriptor 1 and its driver prints their lines to
    sys.stdout; while the report stream is open all of that goes to stderr, and stdout holds the report."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REPORTING], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=True)
    assert done.stdout.splitlines() == ['{"ok": 1}', "after the report"]
    assert done.stderr.splitlines() == ["(raylet) a line of Ray's", "a write to descriptor 1", "a child process"]
