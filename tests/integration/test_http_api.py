"""End to end over real HTTP: the router, the model replicas and the tiny real pipelines."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.embedded import EMBEDDED_VARIANTS

pytestmark = pytest.mark.integration


def png(color=(200, 40, 40), size=(64, 64), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def decode(item):
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def generate(http, **body):
    return http.post("/v1/images/generations", json={"prompt": "a lighthouse at dusk", **body})


def test_generation_returns_pngs_of_the_asked_size_with_metadata(http):
    response = generate(http, model="z-image-turbo", size="96x64", n=2, seed=11, num_inference_steps=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2
    for item in body["data"]:
        image = decode(item)
        assert image.format == "PNG" and image.size == (96, 64)
    assert body["model"] == "z-image-turbo"
    assert body["seeds"] == [11, 12] and [d["seed"] for d in body["data"]] == [11, 12]
    assert body["timings"]["total_s"] > 0 and body["num_inference_steps"] == 2
    assert body["timings"]["encode_s"] > 0 and body["timings"]["to_router_s"] >= 0
    assert [part.split(";")[0] for part in response.headers["server-timing"].split(", ")] == [
        "queue", "total", "encode", "to_router", "answer"]
    assert body["gpu_class"] == "cpu" and body["replica"]
    assert isinstance(body["created"], int)


@pytest.mark.parametrize("size", ["2048x64", "64x2048", "1040x1024"])
def test_generation_takes_every_side_the_catalog_serves(http, catalog, size):
    """A valid request never gets a 5xx: past 1024 px the tiny checkpoint once raised an IndexError (503)."""
    assert max(int(side) for side in size.split("x")) <= catalog.variant("z-image-turbo").max_side
    response = generate(http, model="z-image-turbo", size=size, num_inference_steps=1)
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]).size == tuple(int(side) for side in size.split("x"))


@pytest.mark.parametrize("size", ["2048x64", "64x2048"])
def test_edit_takes_every_side_the_catalog_serves(http, size):
    response = http.post("/v1/images/edits", files=[("image", ("in.png", png(), "image/png"))],
                         data={"prompt": "make it blue", "size": size, "num_inference_steps": "2"})
    assert response.status_code == 200, response.text


def test_a_request_over_the_cost_bound_is_422_naming_it(http):
    # The embedded default bounds a request at 32 megapixel-steps: two CPU cores.
    response = generate(http, size="1024x1024", num_inference_steps=40)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["param"] == "size" and "over this service's limit of 32" in error["message"]


def test_png_takes_output_compression_and_ignores_it(http):
    """As OpenAI's API: the field is for jpeg and webp; PNG is lossless."""
    response = generate(http, size="64x64", num_inference_steps=1, seed=3, output_compression=10)
    assert response.status_code == 200, response.text
    assert response.json()["output_format"] == "png"


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_the_openai_response_fields(http, fmt, pil_format):
    response = generate(http, size="64x64", num_inference_steps=1, output_format=fmt, n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {decode(item).format for item in body["data"]} == {pil_format}
    assert (body["output_format"], body["quality"], body["size"], body["background"]) == (fmt, "auto", "64x64",
                                                                                         "opaque")
    usage = body["usage"]
    assert usage["output_tokens"] == 2 * (64 // 16) ** 2 and usage["input_tokens_details"]["image_tokens"] == 0
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] > 0


def test_compression_sets_the_jpeg_quality(http):
    small, large = (generate(http, size="128x128", seed=4, num_inference_steps=1, output_format="jpeg",
                             output_compression=q).json() for q in (10, 95))
    assert len(small["data"][0]["b64_json"]) < len(large["data"][0]["b64_json"])


def test_quality_picks_the_variants_steps_and_explicit_steps_win(http):
    low = generate(http, size="64x64", quality="low").json()
    assert low["quality"] == "low" and low["num_inference_steps"] == 4
    explicit = generate(http, size="64x64", quality="high", num_inference_steps=1).json()
    assert explicit["quality"] == "high" and explicit["num_inference_steps"] == 1


def test_size_auto_is_the_default_size(http):
    body = generate(http, size="auto", num_inference_steps=1).json()
    assert body["size"] == "256x256"


def test_up_to_ten_images_per_request(http):
    body = generate(http, size="64x64", num_inference_steps=1, n=10).json()
    assert len(body["data"]) == 10 and body["seeds"] == list(range(body["seeds"][0], body["seeds"][0] + 10))


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"n": 11}, 422, "n"),
    ({"output_format": "gif"}, 422, "output_format"),
    ({"output_format": "jpeg", "output_compression": 101}, 422, "output_compression"),
    ({"quality": "ultra"}, 422, "quality"),
    ({"background": "transparent"}, 400, "background"),
    ({"background": "green"}, 422, "background"),
])
def test_bad_output_options_are_4xx_naming_the_field(http, body, status, param):
    response = generate(http, size="64x64", num_inference_steps=1, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_edit_output_options_over_multipart(http):
    response = http.post("/v1/images/edits", files=[("image", ("in.png", png(), "image/png"))],
                         data={"prompt": "make it blue", "size": "64x64", "num_inference_steps": "2",
                               "output_format": "jpeg", "output_compression": "70", "quality": "low",
                               "background": "auto"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode(body["data"][0]).format == "JPEG" and body["quality"] == "low"
    assert body["usage"]["input_tokens_details"]["image_tokens"] > 0
    refused = http.post("/v1/images/edits", files=[("image", ("in.png", png(), "image/png"))],
                        data={"prompt": "x", "background": "transparent"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "background"


def test_generation_seeds_are_reproducible(http):
    first = generate(http, size="64x64", seed=5, num_inference_steps=2).json()
    again = generate(http, size="64x64", seed=5, num_inference_steps=2).json()
    other = generate(http, size="64x64", seed=6, num_inference_steps=2).json()
    a, b, c = (np.asarray(decode(r["data"][0])) for r in (first, again, other))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_default_size_comes_from_the_config(http):
    body = generate(http, num_inference_steps=1).json()
    assert body["size"] == "256x256" and decode(body["data"][0]).size == (256, 256)


@pytest.mark.parametrize("field", ["image", "image[]"])
def test_edit_with_one_image(http, field):
    response = http.post("/v1/images/edits", files=[(field, ("in.png", png(), "image/png"))],
                         data={"prompt": "make it blue", "size": "64x80", "seed": "3", "num_inference_steps": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "qwen-image-edit-2511"  # the alias's first choice that is served
    assert decode(body["data"][0]).size == (64, 80)


def test_edit_with_two_images_and_an_explicit_variant(http):
    files = [("image[]", ("a.png", png((200, 0, 0)), "image/png")),
             ("image[]", ("b.jpg", png((0, 0, 200), fmt="JPEG"), "image/jpeg"))]
    data = {"prompt": "put the red one left of the blue one", "model": "qwen-image-edit-2509", "size": "64x64",
            "seed": "9", "num_inference_steps": "2", "true_cfg_scale": "4.0", "negative_prompt": " "}
    first = http.post("/v1/images/edits", files=files, data=data)
    again = http.post("/v1/images/edits", files=files, data=data)
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "qwen-image-edit-2509"
    assert np.array_equal(np.asarray(decode(first.json()["data"][0])), np.asarray(decode(again.json()["data"][0])))


def test_models_lists_every_variant_with_needs_and_replicas(http, catalog):
    body = http.get("/v1/models").json()
    by_id = {m["id"]: m for m in body["data"]}
    assert set(catalog.variants) <= set(by_id)
    zit = by_id["z-image-turbo"]
    assert zit["task"] == "generate" and zit["precision"] == "bf16" and zit["default_steps"] == 8
    assert zit["served"] is True and zit["replicas"] == 1
    assert zit["vram_gib"]["none"] > 19
    # Resident it took 24.87 GiB on an RTX 5090 (docs/facts.md): a 24 GB card runs it with model offload.
    assert {"gpu_class": "rtx-4090", "offload_mode": "model"}.items() <= next(
        g for g in zit["gpu_classes"] if g["gpu_class"] == "rtx-4090").items()
    fp4 = by_id["qwen-image-edit-2509-svdq-fp4-r32-lightning-8step"]
    # fp4 runs on sm_120/121 only: the RTX 50 series, RTX PRO 6000 Blackwell and GB10.
    assert {g["gpu_class"] for g in fp4["gpu_classes"]} == {
        gpu.id for gpu in catalog.gpus.values() if gpu.sm in (120, 121)} >= {"rtx-5090", "gb10"}
    assert fp4["served"] is False and fp4["replicas"] == 0 and "not configured" in fp4["unavailable_reason"]
    assert by_id["qwen-image-edit"]["resolves_to"] == {"default": "qwen-image-edit-2511"}
    # Lightning in bf16: 4 steps, and it runs where nunchaku does not (Hopper) as well as on 80 GB Ampere.
    lightning = by_id["qwen-image-edit-2511-lightning-4step"]
    assert lightning["default_steps"] == 4 and lightning["precision"] == "bf16"
    assert {"h100-sxm", "a100-80g"} <= {g["gpu_class"] for g in lightning["gpu_classes"]}


def test_healthz_readyz_and_openapi(http):
    assert http.get("/healthz").json()["status"] == "ok"
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert set(ready.json()["replicas"]) == set(EMBEDDED_VARIANTS)
    assert all(count >= 1 for count in ready.json()["replicas"].values())
    schema = http.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/healthz", "/readyz"} <= set(schema["paths"])


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def test_unknown_model_is_404_listing_the_known_ones(http):
    error = error_of(generate(http, model="sdxl"), 404)
    assert error["code"] == "model_not_found" and "z-image-turbo" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"size": "65x64"}, "size"),
    ({"size": "big"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"n": 11}, "n"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -3}, "seed"),
    ({"response_format": "url"}, "response_format"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"quality": "hd"}, "quality"),
    ({"guidance_scale": False}, "guidance_scale"),  # strict types: a JSON false is no 0
    ({"n": "2"}, "n"),
    ({"seed": 1.5}, "seed"),
])
def test_invalid_fields_are_422_naming_the_field(http, body, param):
    error = error_of(generate(http, **body), 422)
    assert error["param"] == param, error


def test_missing_prompt_is_422(http):
    error = error_of(http.post("/v1/images/generations", json={"model": "z-image-turbo"}), 422)
    assert error["param"] == "prompt"


def test_a_variant_this_deployment_cannot_serve_is_503_saying_why(http):
    error = error_of(generate(http, model="z-image-turbo-svdq-int4-r128"), 503)
    assert error["code"] == "model_unavailable" and "not configured" in error["message"]


def test_an_edit_model_on_the_generation_endpoint_is_422(http):
    error = error_of(generate(http, model="qwen-image-edit-2509"), 422)
    assert "/v1/images/edits" in error["message"]


def test_edit_errors(http):
    no_image = http.post("/v1/images/edits", data={"prompt": "x"})
    assert error_of(no_image, 422)["param"] == "image"
    four = [("image[]", (f"{i}.png", png(), "image/png")) for i in range(4)]
    assert error_of(http.post("/v1/images/edits", files=four, data={"prompt": "x"}), 422)["param"] == "image"
    text = [("image", ("fake.png", b"this is not an image", "image/png"))]
    error = error_of(http.post("/v1/images/edits", files=text, data={"prompt": "x"}), 415)
    assert error["code"] == "unsupported_image_type"
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    gif_file = [("image", ("a.gif", gif.getvalue(), "image/gif"))]
    assert error_of(http.post("/v1/images/edits", files=gif_file, data={"prompt": "x"}), 415)["param"] == "image"
    no_prompt = http.post("/v1/images/edits", files=[("image", ("a.png", png(), "image/png"))])
    assert error_of(no_prompt, 422)["param"] == "prompt"


def test_one_step_on_a_scheduler_that_cannot_take_it_is_422(http):
    """The bf16 edit models' scheduler stretches to shift_terminal, which one step divides by zero (a
    NaN image); the request is refused, by variant id and by alias, naming the field."""
    image = [("image", ("a.png", png(), "image/png"))]
    for model in ("qwen-image-edit-2511", "qwen-image-edit"):
        response = http.post("/v1/images/edits", files=image,
                             data={"prompt": "x", "model": model, "size": "64x64", "num_inference_steps": "1"})
        error = error_of(response, 422)
        assert error["param"] == "num_inference_steps" and "at least 2 denoising steps" in error["message"]


def test_unknown_route_is_a_json_404(http):
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
