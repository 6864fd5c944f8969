"""The official openai client and Ray Serve handles, against the running service."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def test_openai_client_generates(openai_client):
    result = openai_client.images.generate(
        model="z-image-turbo", prompt="a red fox", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 42, "num_inference_steps": 2},
    )
    assert len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)
    assert result.model_extra["model"] == "z-image-turbo" and result.model_extra["seeds"] == [42, 43]


def test_openai_client_edits_one_and_two_images(openai_client, png_file):
    one = openai_client.images.edit(model="qwen-image-edit", image=png_file((255, 0, 0)), prompt="make it blue",
                                    size="64x64", extra_body={"seed": 1, "num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(one.data[0].b64_json))).size == (64, 64)
    two = openai_client.images.edit(model="qwen-image-edit-2509", image=[png_file((255, 0, 0)), png_file((0, 0, 255))],
                                    prompt="merge them", size="64x64", extra_body={"num_inference_steps": 2})
    assert two.model_extra["model"] == "qwen-image-edit-2509" and len(two.data) == 1


def test_qwen_image_21_generates_and_edits_from_one_deployment_through_the_openai_client(openai_client, png_file):
    """One variant, one deployment, both routes: the family record (serve_app/domain/families.py) says
    Qwen-Image-2.1 serves generate and edit, and the router sends both to its one deployment."""
    made = openai_client.images.generate(model="qwen-image-2.1", prompt="a lighthouse", size="64x96",
                                         extra_body={"seed": 7, "num_inference_steps": 2})
    assert made.model_extra["model"] == "qwen-image-2.1" and made.model_extra["seeds"] == [7]
    assert Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))).size == (64, 96)
    edited = openai_client.images.edit(model="qwen-image-2.1", image=png_file((255, 0, 0)), prompt="make it blue",
                                       size="64x64", extra_body={"seed": 1, "num_inference_steps": 2})
    assert edited.model_extra["model"] == "qwen-image-2.1"
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).mode == "RGB"
    from ray import serve

    deployments = serve.status().applications["imageserve"].deployments
    assert [name for name in deployments if "qwen-image-2.1" in name] == ["image-qwen-image-2.1"]
    assert made.model_extra["replica"] == edited.model_extra["replica"]  # its one replica made both
    # Sizes in its pipeline's multiple (32), and its own CFG knob: a generation's guidance_scale is refused.
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match="multiples of 32"):
        openai_client.images.generate(model="qwen-image-2.1", prompt="x", size="80x80")
    with pytest.raises(openai.BadRequestError, match="takes no guidance_scale"):
        openai_client.images.generate(model="qwen-image-2.1", prompt="x", size="64x64",
                                      extra_body={"guidance_scale": 2.0})


def test_openai_client_sees_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        openai_client.images.generate(model="dall-e-3", prompt="x")
    assert err.value.body["code"] == "model_not_found"


def test_python_handle_generate_and_edit(service):
    from ray import serve

    from serve_app import EditRequest, GenerateRequest

    handle = serve.get_app_handle("imageserve")
    a = handle.generate.remote(GenerateRequest(prompt="a boat", size="64x64", seed=3, num_inference_steps=2)).result()
    b = handle.generate.remote(GenerateRequest(prompt="a boat", size="64x64", seed=3, num_inference_steps=2)).result()
    assert a.variant == "z-image-turbo" and a.seeds == [3]
    assert np.array_equal(np.asarray(a.pil_images()[0]), np.asarray(b.pil_images()[0]))

    source = io.BytesIO()
    a.pil_images()[0].save(source, format="PNG")
    edited = handle.edit.remote(EditRequest(prompt="make it night", images=[source.getvalue()] * 2,
                                            size="80x64", num_inference_steps=2)).result()
    assert edited.variant == "qwen-image-edit-2511" and edited.pil_images()[0].size == (80, 64)

    webp = handle.generate.remote(GenerateRequest(prompt="a boat", size="64x64", num_inference_steps=1,
                                                  output_format="webp", output_compression=60)).result()
    assert webp.output_format == "webp" and webp.pil_images()[0].format == "WEBP" and webp.usage.output_tokens == 16


def test_python_handle_raises_typed_errors(service):
    from ray import serve

    from serve_app import GenerateRequest, ModelNotFoundError

    handle = serve.get_app_handle("imageserve")
    with pytest.raises(ModelNotFoundError):
        handle.generate.remote(GenerateRequest(prompt="x", model="sdxl")).result()


def test_openai_client_output_options(openai_client, png_file):
    """OpenAI's own option names, passed as the client passes them: no extra_body."""
    result = openai_client.images.generate(
        model="z-image-turbo", prompt="a red fox", size="64x64", output_format="jpeg", output_compression=80,
        quality="low", background="opaque")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "JPEG" and image.size == (64, 64)
    assert (result.output_format, result.quality, result.size, result.background) == ("jpeg", "low", "64x64",
                                                                                       "opaque")
    assert result.model_extra["num_inference_steps"] == 4  # z-image-turbo's "low" preset
    usage = result.usage
    assert usage.output_tokens == 16 and usage.input_tokens_details.text_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    edited = openai_client.images.edit(model="qwen-image-edit-2509", image=png_file((255, 0, 0)), prompt="blue",
                                       size="64x64", output_format="webp", quality="low",
                                       extra_body={"num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).format == "WEBP"
    assert edited.usage.input_tokens_details.image_tokens > 0 and edited.model_extra["num_inference_steps"] == 2


def test_openai_client_transparent_background_is_a_400(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        openai_client.images.generate(model="z-image-turbo", prompt="x", size="64x64", background="transparent")
    assert err.value.body["code"] == "unsupported_value" and err.value.body["param"] == "background"
