"""``imageserve download`` against a local server speaking the Hub's file API, then serving offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app.domain.config import parse_config
from serve_app.download import DownloadError, check_free_space, needs
from serve_app.engines.loading import pipeline_folders
from tests.serve_app.hub_server import FakeHub, Repo

ROOT = Path(__file__).resolve().parents[2]
Z_IMAGE = "Tongyi-MAI/Z-Image-Turbo"
NUNCHAKU = "nunchaku-tech/nunchaku-z-image-turbo"
INT4 = "svdq-int4_r128-z-image-turbo.safetensors"
# Over huggingface_hub's 10 MiB download chunk, so a download cut halfway leaves bytes on disk to resume from.
LARGE = "transformer/large_shard.bin"
FP4 = "svdq-fp4_r32-z-image-turbo.safetensors"


@pytest.fixture
def hub(tiny_models):
    """The tiny Z-Image checkpoint as Z-Image-Turbo's repository (plus files a pipeline does not load),
    and a nunchaku repository holding two 4-bit transformer files."""
    not_loaded = {"README.md": b"# Z-Image-Turbo\n", "assets/demo.png": b"\x89PNG" * 64}
    fake = FakeHub({
        Z_IMAGE: FakeHub.repo_from_folder(tiny_models["z-image-turbo"], "a" * 40,
                                          extra={**not_loaded, LARGE: os.urandom(24 << 20)}),
        NUNCHAKU: Repo({INT4: os.urandom(4096), FP4: os.urandom(4096), "README.md": b"# 4-bit\n"}, "b" * 40),
    })
    server, url = fake.serve()
    fake.url = url
    yield fake
    server.shutdown()
    server.server_close()


def run_download(hub, tmp_path, models: dict, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "serve_app.cli", "download", "--config", str(config),
                           "--cache-dir", str(tmp_path / "cache"), "--keep-free-gb", "0", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_a_pipeline_is_fetched_resumed_verified_and_then_served_offline(hub, tmp_path, tiny_models,
                                                                        load_engine_for):
    hub.cut_once.add((Z_IMAGE, LARGE))  # the connection drops halfway through the largest file
    done = run_download(hub, tmp_path, {"z-image-turbo": {}})
    assert done.returncode == 0, done.stderr + done.stdout
    assert "files verified" in done.stdout
    # Exactly the pipeline: model_index.json and the folders it lists, not the README or the assets.
    fetched = hub.fetched(Z_IMAGE)
    index = json.loads(hub.repos[Z_IMAGE].files["model_index.json"])
    folders = pipeline_folders(index, with_transformer=True)
    expected = {"model_index.json"} | {p for p in hub.repos[Z_IMAGE].files if p.split("/")[0] in folders}
    assert fetched == expected and "README.md" not in fetched and not hub.fetched(NUNCHAKU)
    assert hub.ranges(Z_IMAGE, LARGE)  # resumed from where it broke, not started over

    # Serving then runs offline from that cache (the tests run with HF_HUB_OFFLINE=1).
    config = parse_config({"device": {"device": "cpu"}, "serving": {"warmup": False},
                           "hf": {"offline": True, "cache_dir": str(tmp_path / "cache")},
                           "models": {"z-image-turbo": {}}})
    engine = load_engine_for(config, "z-image-turbo")
    result = engine.generate("a lighthouse", width=64, height=64, num_inference_steps=1, seed=1)
    assert len(result.images) == 1


def test_a_nunchaku_variant_takes_its_one_file_and_no_bf16_transformer(hub, tmp_path):
    done = run_download(hub, tmp_path, {"z-image-turbo-svdq-int4-r128": {}}, "--json")
    assert done.returncode == 0, done.stderr
    assert not any(p.startswith("transformer/") for p in hub.fetched(Z_IMAGE))
    assert "text_encoder/config.json" in hub.fetched(Z_IMAGE)
    assert hub.fetched(NUNCHAKU) == {INT4}
    report = json.loads(done.stdout)
    assert report["repos"][NUNCHAKU]["files"] == [INT4]


def test_not_enough_disk_is_refused_before_anything_is_fetched(hub, tmp_path):
    done = run_download(hub, tmp_path, {"z-image-turbo": {}}, "--keep-free-gb", "1000000")
    assert done.returncode == 2
    assert "not enough disk" in done.stderr and "GB missing" in done.stderr
    assert hub.fetched(Z_IMAGE) <= {"model_index.json"}  # read to know the folders; nothing else


def test_a_file_that_fails_its_hash_is_removed_and_reported(hub, tmp_path):
    hub.wrong_hash.add((NUNCHAKU, INT4))
    done = run_download(hub, tmp_path, {"z-image-turbo-svdq-int4-r128": {}})
    assert done.returncode == 2
    assert f"{NUNCHAKU}/{INT4} failed its check" in done.stderr
    assert not list((tmp_path / "cache").rglob(INT4))


def test_local_sources_need_nothing_and_4bit_repos_drop_the_transformer(tiny_models):
    config = parse_config({"models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])},
                                      "z-image-turbo-svdq-fp4-r32": {}}})
    repos, local = needs(config)
    assert list(local) == ["z-image-turbo"]
    by_repo = {r.repo_id: r for r in repos}
    assert by_repo[Z_IMAGE].pipeline and not by_repo[Z_IMAGE].with_transformer
    assert by_repo[NUNCHAKU].files == {FP4}


def test_the_disk_check_says_how_much_is_missing():
    check_free_space(10e9, 20e9, "/data", keep_free_gb=5)
    with pytest.raises(DownloadError, match=r"needs 30.00 GB .* 5 GB should stay free, .* 12.00 GB are free: "
                                            r"23.00 GB missing"):
        check_free_space(30e9, 12e9, "/data", keep_free_gb=5)


def test_a_pinned_commit_is_fetched_and_loaded_though_main_moved_on(hub, tmp_path, load_engine_for):
    pinned = hub.repos[Z_IMAGE]
    moved = dict(pinned.files, **{"model_index.json": b'{"_class_name": "NotAPipeline"}'})
    hub.repos[Z_IMAGE] = Repo(moved, "c" * 40, older={pinned.commit: pinned.files})

    done = run_download(hub, tmp_path, {"z-image-turbo": {"revision": pinned.commit}}, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["repos"][Z_IMAGE]["commit"] == pinned.commit and report["repos"][Z_IMAGE]["pinned"]
    assert all(f"/resolve/{pinned.commit}/" in url for method, url, _ in hub.requests
               if method == "GET" and url.startswith(f"/{Z_IMAGE}/resolve/"))

    # Loading asks for the same commit, offline: main's broken model_index.json is never read.
    config = parse_config({"device": {"device": "cpu"}, "serving": {"warmup": False},
                           "hf": {"offline": True, "cache_dir": str(tmp_path / "cache"),
                                  "require_pinned_revisions": True},
                           "models": {"z-image-turbo": {"revision": pinned.commit}}})
    engine = load_engine_for(config, "z-image-turbo")
    assert len(engine.generate("a lighthouse", width=64, height=64, num_inference_steps=1, seed=1).images) == 1


def test_an_unpinned_download_names_the_commit_to_pin(hub, tmp_path):
    done = run_download(hub, tmp_path, {"z-image-turbo-svdq-int4-r128": {}})
    assert done.returncode == 0, done.stderr
    assert f"models.z-image-turbo-svdq-int4-r128.revision: {'a' * 40}" in done.stdout
    assert f"models.z-image-turbo-svdq-int4-r128.transformer_revision: {'b' * 40}" in done.stdout


def test_a_lightning_variant_takes_its_pipeline_and_its_lora_file(tmp_path):
    lora = tmp_path / "mine.safetensors"
    config = parse_config({"models": {"qwen-image-edit-2511-lightning-4step": {},
                                      "qwen-image-edit-2509-lightning-4step": {"lora_source": str(lora)}}})
    repos, local = needs(config)
    by_repo = {r.repo_id: r for r in repos}
    assert by_repo["Qwen/Qwen-Image-Edit-2511"].pipeline and by_repo["Qwen/Qwen-Image-Edit-2511"].with_transformer
    assert by_repo["lightx2v/Qwen-Image-Edit-2511-Lightning"].files == {
        "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"}
    assert "lightx2v/Qwen-Image-Lightning" not in by_repo  # 2509's LoRA is a local file here
    assert local == {"qwen-image-edit-2509-lightning-4step (LoRA)": str(lora)}


def test_per_request_loras_from_the_hub_take_their_one_file(tmp_path):
    config = parse_config({"models": {"z-image-turbo": {}},
                           "loras": {"ink": {"source": "someone/z-loras", "file": "ink.safetensors",
                                             "revision": "c" * 40, "variants": ["z-image-turbo"]},
                                     "mine": {"source": str(tmp_path / "mine.safetensors"),
                                              "variants": ["z-image-turbo"]}}})
    repos, local = needs(config)
    (ink,) = [r for r in repos if r.repo_id == "someone/z-loras"]
    assert ink.files == {"ink.safetensors"} and ink.revision == "c" * 40 and not ink.pipeline
    assert local["LoRA mine"] == str(tmp_path / "mine.safetensors")


def test_a_hub_it_cannot_reach_is_one_line_naming_the_endpoint_and_hf_endpoint(tmp_path):
    """Without a network it was a 76-line traceback ending in ConnectError, naming neither the Hub nor the fix."""
    from serve_app.runner import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: refused at once, as an offline DNS fails
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {"z-image-turbo": {}}}))
    env = {**os.environ, "HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-m", "serve_app.cli", "download", "--config", str(config), "--dry-run",
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"imageserve download: cannot reach the Hub at {closed} for Tongyi-MAI/Z-Image-Turbo")
    assert "point HF_ENDPOINT at a Hub mirror you can reach" in done.stderr
