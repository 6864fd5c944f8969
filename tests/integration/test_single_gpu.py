"""examples/single-gpu.yaml through real Serve: one replica answers both tasks, swapping, with the variant
carried as Serve's multiplexed model id and the resident one reported back for routing."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

APP = "single-gpu"
ROUTE = "/single-gpu"
GENERATE = "z-image-turbo-svdq-int4-r128"
EDIT = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"
DEPLOYMENT = "swap-single-gpu"


@pytest.fixture(scope="module")
def single_gpu(service, tiny_root):
    from ray import serve

    from serve_app.domain.config_files import load_config
    from serve_app.embedded import on_tiny_checkpoints

    config, loaders, _ = on_tiny_checkpoints(load_config(ROOT / "examples" / "single-gpu.yaml"), tiny_root)
    config = config.model_copy(update={"serving": config.serving.model_copy(update={"app_name": APP})})
    service.add_application(config, ROUTE, loaders)
    try:
        yield f"{service.url}{ROUTE}"
    finally:
        serve.delete(APP)


def replica_info():
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT, app_name=APP).info.remote().result(timeout_s=60)


def test_one_replica_answers_both_tasks_over_http_and_counts_its_swaps(single_gpu, png_file):
    from openai import OpenAI

    client = OpenAI(base_url=single_gpu + "/v1", api_key="unused", max_retries=0, timeout=300)
    before = replica_info()["swaps"]
    generated = client.images.generate(model=GENERATE, prompt="a lighthouse", size="64x64",
                                       extra_body={"seed": 1, "num_inference_steps": 2})
    edited = client.images.edit(model=EDIT, image=png_file((200, 40, 40)), prompt="make it blue", size="64x64",
                                extra_body={"seed": 1, "num_inference_steps": 2})
    again = client.images.generate(model=GENERATE, prompt="a lighthouse", size="64x64",
                                   extra_body={"seed": 2, "num_inference_steps": 2})
    assert generated.data[0].b64_json and edited.data[0].b64_json and again.data[0].b64_json
    info = replica_info()
    assert info["variants"] == [GENERATE, EDIT]
    assert info["swaps"] - before == 2  # to the edit model and back
    assert info["resident"] == [GENERATE]
    # The replica told Serve which variant is on its GPU, through @serve.multiplexed.
    assert info["reported"] == GENERATE


def test_the_models_list_shows_both_variants_served_by_the_group(single_gpu):
    import httpx

    listed = {m["id"]: m for m in httpx.get(single_gpu + "/v1/models", timeout=60).json()["data"]}
    for variant in (GENERATE, EDIT):
        assert listed[variant]["served"]
        assert [p["deployment"] for p in listed[variant]["pools"]] == [DEPLOYMENT]


def test_the_variant_on_the_gpu_is_a_metric(single_gpu, service):
    import time

    import httpx

    wanted = 'group="single-gpu"'
    # Ray exports a replica's series every second here; the gauge is set when the replica starts.
    deadline = time.monotonic() + 120
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [line for line in httpx.get(service.url + "/metrics", timeout=60).text.splitlines()
                 if line.startswith("ray_imageserve_resident_variant{") and wanted in line]
        if len(lines) == 2:
            break
        time.sleep(1)
    assert sorted(line.rsplit(" ", 1)[1] for line in lines) == ["0.0", "1.0"], lines
