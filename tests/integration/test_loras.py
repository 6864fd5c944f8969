"""Per-request LoRAs end to end: the embedded default lists tiny LoRAs (built offline with peft), and a request
names one over HTTP, through the official client, or through a handle."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.int16)


def generate(http, **body):
    response = http.post("/v1/images/generations", json={
        "prompt": "a lighthouse at dusk", "model": "z-image-turbo", "size": "64x64", "seed": 5,
        "num_inference_steps": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_listed_lora_changes_the_image_and_a_plain_request_after_it_does_not(http):
    plain = pixels(generate(http)["data"][0])
    styled = generate(http, lora={"name": "tiny-style", "scale": 1.0})
    assert styled["model"] == "z-image-turbo"
    assert np.abs(pixels(styled["data"][0]) - plain).mean() > 0.5
    np.testing.assert_array_equal(pixels(generate(http)["data"][0]), plain)


@pytest.mark.parametrize(("lora", "code", "param"), [
    ({"name": "not-listed"}, "lora_not_found", "lora"),
    ({"name": "tiny-edit-style"}, "unsupported_value", "lora"),  # an edit model's LoRA, asked of generation
    ({"name": "tiny-style", "scale": 9}, "invalid_request", "lora.scale"),
    ({"name": "../etc/passwd"}, "invalid_request", "lora.name"),
])
def test_a_lora_not_on_the_list_or_not_for_the_model_is_a_4xx_naming_the_field(http, lora, code, param):
    response = http.post("/v1/images/generations", json={"prompt": "x", "model": "z-image-turbo", "lora": lora})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param


def test_an_edit_takes_its_lora_as_form_fields(http, png_bytes):
    def edit(**fields):
        response = http.post("/v1/images/edits", files=[("image", ("in.png", png_bytes, "image/png"))],
                             data={"prompt": "make it blue", "model": "qwen-image-edit-2511", "size": "64x64",
                                   "seed": "3", "num_inference_steps": "2", **fields})
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0])

    assert np.abs(edit(lora="tiny-edit-style", lora_scale="2") - edit()).max() > 0


def test_the_official_client_sends_a_lora_in_extra_body(openai_client):
    result = openai_client.images.generate(prompt="a lighthouse", model="z-image-turbo", size="64x64",
                                           extra_body={"lora": {"name": "tiny-style", "scale": 0.5}, "seed": 5,
                                                       "num_inference_steps": 2})
    assert result.data[0].b64_json


def test_models_lists_the_loras_each_variant_takes(http):
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed["z-image-turbo"]["loras"] == ["tiny-style"]
    assert listed["qwen-image-edit-2511"]["loras"] == ["tiny-edit-style"]
