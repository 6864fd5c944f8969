"""Replicas of two ranks (context parallel over gloo, in Ray actors on one node) against the same models in one
process: the same requests give the same images, through batching, previews, per-request LoRAs and a caller
who leaves mid-stream.

Tolerance: PNG channels within 1 of 255. Measured here, the two-rank float images differ from the one-process
ones by at most 1.4e-6 (Z-Image) and 3.3e-7 (Qwen-Image-Edit): the all-to-all reorders no sum that matters, so
the encoded bytes agree unless a value sits on a rounding edge.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.multi_gpu.conftest import PARALLEL_MODELS


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def assert_same_images(parallel: dict, one: dict) -> None:
    assert len(parallel["data"]) == len(one["data"])
    for a, b in zip(parallel["data"], one["data"], strict=True):
        assert np.abs(pixels(a["b64_json"]) - pixels(b["b64_json"])).max() <= 1


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def both(http, model: str, **fields) -> tuple[dict, dict]:
    """The same request to the two-rank replicas and to the one-process ones."""
    answers = []
    for prefix in ("", "/one"):
        if model == "z-image-turbo":
            response = http.post(f"{prefix}/v1/images/generations", json={"model": model, **fields})
        else:
            response = http.post(f"{prefix}/v1/images/edits", data={"model": model, **fields},
                                 files=[("image[]", ("in.png", png((200, 40, 40)), "image/png"))])
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers[0], answers[1]


def rank_pids(deployment: str) -> list[int]:
    from ray import serve

    return serve.get_deployment_handle(deployment, "parallel").rank_pids.remote().result(timeout_s=60)


@pytest.mark.parametrize("deployment", ["gen-z-image-turbo", "edit-qwen-image-edit-2511"])
def test_each_replica_runs_in_two_processes(multi_gpu, deployment):
    import os

    pids = rank_pids(deployment)
    assert len(pids) == len(set(pids)) == 2 and os.getpid() not in pids


@pytest.mark.parametrize("model", PARALLEL_MODELS)
def test_two_ranks_give_the_one_process_image(http, model):
    fields = {"prompt": "a lighthouse at dusk, seen from the sea", "size": "128x128", "num_inference_steps": 2,
              "seed": 11}
    parallel, one = both(http, model, **fields)
    assert parallel["seeds"] == one["seeds"] == [11]
    assert_same_images(parallel, one)


def test_a_batch_of_prompts_of_two_lengths_gives_the_one_process_images(http):
    """Two images in one call pad the shorter prompt and mask it: the mask stays whole on every rank."""
    parallel, one = both(http, "z-image-turbo", prompt="a cat", size="128x128", num_inference_steps=2, seed=5, n=2)
    assert_same_images(parallel, one)


def test_a_request_without_a_seed_gets_one_seed_on_every_rank(http):
    """Each rank would draw its own: the replica draws once and sends it to all (a mismatch would garble the
    image, or hang the ranks in a collective)."""
    response = http.post("/v1/images/generations", json={"model": "z-image-turbo", "prompt": "unseeded",
                                                         "size": "128x128", "num_inference_steps": 2})
    assert response.status_code == 200
    seed = response.json()["seeds"][0]
    parallel, one = both(http, "z-image-turbo", prompt="unseeded", size="128x128", num_inference_steps=2, seed=seed)
    assert_same_images(parallel, one)
    assert parallel["data"][0]["b64_json"] == response.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("model,lora", [("z-image-turbo", "tiny-style"), ("qwen-image-edit-2511", "tiny-edit-style")])
def test_a_per_request_lora_loads_on_every_rank(http, model, lora):
    fields = {"prompt": "styled", "size": "128x128", "num_inference_steps": 2, "seed": 3}
    plain, _ = both(http, model, **fields)
    extra = {"lora": {"name": lora}} if model == "z-image-turbo" else {"lora": lora}
    parallel, one = both(http, model, **fields, **extra)
    assert_same_images(parallel, one)
    assert parallel["data"][0]["b64_json"] != plain["data"][0]["b64_json"]  # the LoRA changed the image


def stream_events(http, prefix: str, body: dict, leave_after_first_preview: bool = False) -> list[dict]:
    events = []
    with http.stream("POST", f"{prefix}/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if leave_after_first_preview and events[-1]["type"].endswith("partial_image"):
                    break
    return events


def test_a_stream_previews_and_ends_with_the_one_process_image(http):
    body = {"model": "z-image-turbo", "prompt": "streamed", "size": "128x128", "num_inference_steps": 4, "seed": 8,
            "stream": True, "partial_images": 2}
    parallel, one = (stream_events(http, prefix, body) for prefix in ("", "/one"))
    kinds = [e["type"] for e in parallel]
    assert kinds == [e["type"] for e in one] and kinds.count("image_generation.partial_image") == 2
    final = {"data": [{"b64_json": parallel[-1]["b64_json"]}]}, {"data": [{"b64_json": one[-1]["b64_json"]}]}
    assert_same_images(*final)


def test_a_caller_who_leaves_mid_stream_leaves_the_next_request_as_on_one_process(http):
    """The ranks finish the call the caller left (stopping one between steps would strand the others in a
    collective), and nothing of it stays behind."""
    body = {"model": "z-image-turbo", "prompt": "left early", "size": "128x128", "num_inference_steps": 6,
            "seed": 1, "stream": True, "partial_images": 3}
    stream_events(http, "", body, leave_after_first_preview=True)
    parallel, one = both(http, "z-image-turbo", prompt="after the one who left", size="160x128",
                         num_inference_steps=2, seed=2)
    assert_same_images(parallel, one)
