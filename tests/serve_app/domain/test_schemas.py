"""The request and response types, without Ray."""

import pytest
from pydantic import ValidationError

from serve_app.domain.schemas import GenerateRequest, ImageResult, ImagesResponse, Usage


def test_the_http_answer_is_what_the_schema_declares():
    answer = ImagesResponse.model_validate(two_images().to_openai())
    assert [d.seed for d in answer.data] == [7, 8]
    assert (answer.size, answer.output_format, answer.quality) == ("256x256", "png", "low")
    assert answer.usage.total_tokens == 524


def two_images(**fields) -> ImageResult:
    return ImageResult(
        images=[b"\x89PNG one", b"\x89PNG two"], variant="z-image-turbo", output_format="png", quality="low",
        usage=Usage(input_tokens=12, input_tokens_details={"text_tokens": 12, "image_tokens": 0},
                    output_tokens=512, total_tokens=524),
        seeds=[7, 8], width=256, height=256, num_inference_steps=4, timings={"total_s": 0.5}, created=1, **fields)


@pytest.mark.parametrize("internals", [True, False])
@pytest.mark.parametrize("fields", [{}, {"pool": 'a "quoted" \\ pool \u00e9', "replica": '"b64_json":""'},
                                    {"retried_from": "small"}])
def test_the_spliced_body_is_byte_for_byte_what_json_response_writes(internals, fields):
    """The replica's base64 is spliced into the answer (issue 31): the bytes must be what Starlette's
    JSONResponse writes for ``to_openai``, whatever the other fields hold, a placeholder look-alike included."""
    from starlette.responses import JSONResponse

    result = two_images(**fields)
    assert result.openai_body(internals) == JSONResponse(result.to_openai(internals)).body


def test_the_answer_carries_each_image_as_the_stdlib_base64_of_its_bytes():
    """pybase64 writes the texts: they must be what the stdlib's base64 writes."""
    import base64
    import json

    data = bytes(range(256)) * 7 + b"\x00\xff"  # every byte value; a length that needs padding
    result = two_images().model_copy(update={"images": [data, b""]})
    expected = [base64.b64encode(data).decode(), ""]
    assert [d["b64_json"] for d in result.to_openai()["data"]] == expected
    assert [d["b64_json"] for d in json.loads(result.openai_body())["data"]] == expected


@pytest.mark.parametrize("field, value", [("guidance_scale", False), ("n", "2"), ("n", True), ("seed", 1.5)])
def test_requests_take_no_loosely_typed_values(field, value):
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "a cat", field: value})


def test_integral_numbers_count_as_integers_as_json_schema_says():
    request = GenerateRequest.model_validate({"prompt": "a cat", "n": 2.0, "seed": 7.0})
    assert (request.n, request.seed) == (2, 7) and isinstance(request.n, int)
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "a cat", "n": 2.5})


def test_the_schema_lists_only_the_backgrounds_that_work_but_transparent_parses_for_its_own_400():
    field = GenerateRequest.model_json_schema()["properties"]["background"]
    assert field["anyOf"][0]["enum"] == ["opaque", "auto"]
    assert GenerateRequest(prompt="a cat", background="transparent").background == "transparent"


def test_previews_are_taken_at_evenly_spaced_steps_before_the_last():
    from serve_app.domain.schemas import preview_steps

    assert preview_steps(8, 2) == [2, 4] and preview_steps(8, 3) == [1, 3, 5] and preview_steps(40, 1) == [19]
    assert preview_steps(4, 3) == [0, 1, 2]  # at most one per step, none after the last
    assert preview_steps(2, 3) == [0] and preview_steps(1, 2) == [] and preview_steps(8, 0) == []
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="x", partial_images=4)
