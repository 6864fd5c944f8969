"""Typed requests and results, shared by the HTTP API and the Python handle API.

Field names follow the OpenAI images API (``model``, ``prompt``, ``n``, ``size``, ``quality``,
``output_format``, ``output_compression``, ``background``, ``response_format``) plus the diffusers names
users know (``seed``, ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale``, ``negative_prompt``).
"""

from __future__ import annotations

import io
import json
import re
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import pybase64
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from typing_extensions import TypedDict

from serve_app.domain.images import OutputFormat

if TYPE_CHECKING:
    from serve_app.domain.catalog import ModelVariant

SIZE_PATTERN = re.compile(r"^([1-9]\d{0,3})x([1-9]\d{0,3})$")
SIDE_MULTIPLE = 16  # VAE factor 8 x transformer patch 2, for every model served here
MAX_SIDE = 4096     # no variant takes more; each variant's own, smaller bound is checked at the router
_SIDES = "|".join(str(side) for side in range(SIDE_MULTIPLE, MAX_SIDE + 1, SIDE_MULTIPLE))
# The same rule as parse_size, for the OpenAPI schema (clients and schemathesis generate from it).
SIZE_SCHEMA_PATTERN = f"^(auto|({_SIDES})x({_SIDES}))$"
NOT_BLANK_PATTERN = r"\S"
# The largest seed a request may give; engines draw random seeds below it and wrap seed + i past it.
MAX_SEED = 2**31 - 1
MAX_PARTIAL_IMAGES = 3  # OpenAI's partial_images
MAX_IMAGES = 10  # OpenAI's n; the router lowers it where the planner says a batch that large does not fit
Quality = Literal["low", "medium", "high", "auto"]
# transparent is parsed so that it gets its own 400 (OpenAI's clients send it); the schema lists what works.
Background = Annotated[Literal["transparent", "opaque", "auto"],
                       WithJsonSchema({"enum": ["opaque", "auto"], "type": "string"})]



def parse_size(size: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); raises ValueError naming the rule that failed."""
    match = SIZE_PATTERN.match(size)
    if not match:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '1024x1024' (got {size!r})")
    width, height = int(match.group(1)), int(match.group(2))
    if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
        raise ValueError(f"width and height must be multiples of {SIDE_MULTIPLE} (got {width}x{height})")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"width and height must be from {SIDE_MULTIPLE} to {MAX_SIDE} (got {width}x{height})")
    return width, height


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_LORA_SCALE = 4.0


class LoraRequest(BaseModel):
    """A LoRA adapter to apply to the transformer for one request: one of the service's ``loras`` (its
    allow-list, which /v1/models lists per variant), at ``scale``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=LORA_NAME_PATTERN, description="The LoRA's name in the service's `loras` config.")
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
                         description="Weight of the LoRA's update (0: none; 1: as trained).")


class _Request(BaseModel):
    # strict: JSON's false is no 0 and "4" is no 4 (multipart edits are typed by the endpoint first).
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="Variant id or alias; the task's default alias when null.")
    prompt: str = Field(min_length=1, max_length=4000, json_schema_extra={"pattern": NOT_BLANK_PATTERN},
                        description="What to draw, or the edit instruction; not blank.")
    n: int = Field(default=1, ge=1, le=MAX_IMAGES,
                   description="Number of images, made in one pipeline call; at most what the planner says fits.")
    size: str | None = Field(
        default=None, json_schema_extra={"pattern": SIZE_SCHEMA_PATTERN},
        description=f"'WIDTHxHEIGHT', multiples of {SIDE_MULTIPLE} up to {MAX_SIDE} (each variant's own range in "
                    "/v1/models), or 'auto': the variant's default when null or auto.")
    quality: Quality | None = Field(
        default=None, description="Denoising steps from the variant's presets (catalog `quality_steps`); an "
                                  "explicit num_inference_steps wins. auto or null: the variant's default steps.")
    output_format: OutputFormat = Field(default="png", description="Encoding of the returned images.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100,
        description="JPEG/WEBP quality, 0-100 (OpenAI's default 100); png is lossless and ignores it.")
    background: Background | None = Field(
        default=None, description="opaque or auto; transparent is refused (400): these models make no alpha.")
    response_format: Literal["b64_json"] = Field(default="b64_json", description="Only b64_json: no image storage.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Image i uses seed + i; random when null.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=100, description="Denoising steps.")
    negative_prompt: str | None = Field(default=None, max_length=4000)
    user: str | None = Field(default=None, max_length=256, description="Accepted for OpenAI compatibility; unused.")
    stream: bool = Field(default=False, description="Answer as Server-Sent Events: partial images while the image "
                                                    "forms, then the completed image (docs/streaming.md).")
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES,
                                description="With stream: previews per image, at evenly spaced denoising steps.")
    lora: LoraRequest | None = Field(
        default=None, description="A LoRA from the service's allow-list, applied for this request only "
                                  "(docs/loras.md); an unlisted name is refused (404).")

    @field_validator("n", "output_compression", "seed", "num_inference_steps", "partial_images", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        """JSON Schema counts 8.0 as an integer, so the API takes it as 8; bools and strings stay refused."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            parse_size(value)
        return value

    def dimensions(self) -> tuple[int | None, int | None]:
        if self.size is None or self.size == "auto":
            return None, None
        return parse_size(self.size)

    def cost(self, width: int, height: int, steps: int, cfg: bool = False) -> float:
        """What the request asks of a GPU, in megapixel-steps: output megapixels x steps x n, times one plus
        the input images (each is encoded and adds its latents to every step's sequence), times two when it runs
        classifier-free guidance (``runs_cfg``: two transformer forwards a step)."""
        return width * height / 1e6 * steps * self.n * (1 + self.num_input_images) * (2 if cfg else 1)

    def runs_cfg(self, variant: ModelVariant) -> bool:
        """Whether ``variant`` runs classifier-free guidance for this request (its defaults where it says nothing)."""
        return variant.runs_cfg(getattr(self, "guidance_scale", None), getattr(self, "true_cfg_scale", None),
                                self.negative_prompt)

    @property
    def input_images(self) -> list[bytes]:
        """Encoded images the request gives the model to work from (none for generation)."""
        return []

    @property
    def num_input_images(self) -> int:
        return len(self.input_images)


class GenerateRequest(_Request):
    """Text to image (``POST /v1/images/generations``)."""

    task: ClassVar[str] = "generate"

    guidance_scale: float | None = Field(default=None, ge=0, le=20,
                                         description="CFG scale; Z-Image-Turbo: 0, and CFG runs above 0.")


MAX_EDIT_IMAGES = 3  # Qwen-Image-Edit-2509/2511 take one to three input images


class EditRequest(_Request):
    """Instruction editing of 1 to 3 images (``POST /v1/images/edits``)."""

    task: ClassVar[str] = "edit"

    images: list[bytes] = Field(min_length=1, max_length=MAX_EDIT_IMAGES,
                                description="Encoded input images (PNG, JPEG, WEBP).")
    true_cfg_scale: float | None = Field(default=None, ge=0, le=20,
                                         description="CFG runs when > 1 (with a negative prompt).")

    @property
    def input_images(self) -> list[bytes]:
        return self.images


class Usage(BaseModel):
    """OpenAI's ``usage`` object, counted in what these models process (docs/api.md): text tokens by the
    pipeline's own tokenizer, image tokens as the transformer's latent patches (16x16 pixels each)."""

    input_tokens: int
    input_tokens_details: dict[str, int] = Field(description="image_tokens and text_tokens.")
    output_tokens: int = Field(description="Latent patches of the output images.")
    total_tokens: int


class ImageData(BaseModel):
    """One image of an images response."""

    b64_json: str = Field(description="The encoded image (output_format), base64.")
    revised_prompt: str | None = Field(default=None, description="Always null: prompts are used as given.")
    seed: int = Field(description="The seed this image was made with (imageserve).")


class ImagesResponse(BaseModel):
    """The answer of both image routes over HTTP: OpenAI's images response, with imageserve's metadata
    next to it (what ``ImageResult.to_openai`` writes; declared for the OpenAPI schema)."""

    created: int
    data: list[ImageData]
    model: str = Field(description="The catalog variant that ran.")
    background: Literal["opaque"]
    output_format: OutputFormat
    quality: Quality
    size: str = Field(description="'WIDTHxHEIGHT' of the images.")
    usage: Usage | None
    seeds: list[int]
    num_inference_steps: int
    # Where and how it ran: absent when serving.show_internals is false (they show other callers' load).
    timings: StageTimings | None = Field(default=None, description="Seconds per stage (queue_s, ...).")
    replica: str | None = None
    gpu_class: str | None = None
    pool: str | None = None
    retried_from: str | None = Field(default=None, description="The pool that ran out of memory first, if any.")
    batch_images: int | None = Field(default=None, description="Images computed in the same pipeline call.")


def preview_steps(num_inference_steps: int, partial_images: int) -> list[int]:
    """The 0-based denoising steps after which the ``partial_images`` previews are taken: evenly spaced, the
    last well before the end (the completed image follows it), at most one per step."""
    if partial_images <= 0 or num_inference_steps < 2:
        return []
    count = min(partial_images, num_inference_steps - 1)
    return sorted({max(0, round((i + 1) * num_inference_steps / (count + 1)) - 1) for i in range(count)})


class StreamAccepted(BaseModel):
    """The first event of a stream: a replica took the request (so nothing refuses it for capacity any more)."""

    variant: str = Field(description="The catalog variant that runs it.")
    num_inference_steps: int
    preview_steps: list[int] = Field(description="Steps done when each image's previews will be taken.")


class PartialImage(BaseModel):
    """A preview of one image while it forms: what a stream yields before the ``ImageResult``."""

    image_index: int = Field(description="Which of the request's n images it shows.")
    partial_image_index: int = Field(description="0-based, per image, in the order they are taken.")
    step: int = Field(description="Denoising steps done when it was taken.")
    image: bytes = Field(description="The preview, encoded in the request's output_format at the request's size.")
    output_format: OutputFormat = "png"
    width: int
    height: int


class StageTimings(TypedDict, total=False):
    """Seconds of the pipeline call(s) that made a result, by stage, as the engine times them (docs/metrics.md):
    the stages it wraps, the denoising (the rest of the call), the whole call, and what the replica adds."""

    text_encode_s: float
    vae_encode_s: float
    vae_decode_s: float
    lora_load_s: float  # a per-request LoRA loaded or hotswapped for this call
    denoise_s: float
    total_s: float
    queue_s: float  # waiting in the replica's queue for a batch (the replica adds it)
    encode_s: float  # the images encoded in the replica's encoder threads
    to_router_s: float  # from the replica handing the result over to the router holding it: Ray moving it


class ImageResult(BaseModel):
    """What a generate or edit call returns, through a handle or (as JSON) over HTTP."""

    variant: str = Field(description="The catalog variant that ran.")
    images: list[bytes] = Field(description="Encoded images (output_format), one per image.")
    output_format: OutputFormat = "png"
    quality: Quality = Field(default="auto", description="The quality preset asked for (auto: the default steps).")
    usage: Usage | None = None
    seeds: list[int] = Field(description="Seed of each image.")
    width: int
    height: int
    num_inference_steps: int
    timings: StageTimings = Field(default_factory=dict, description="Seconds per stage and in total.")
    replica: str | None = None
    gpu_class: str | None = Field(default=None, description="GPU class of the replica ('cpu' without one).")
    pool: str | None = Field(default=None, description="GPU pool whose replica served the request.")
    node_gpu_class: str | None = Field(default=None, description="GPU class the replica's node reports.")
    fits_node: bool | None = Field(default=None, description="Whether the planner says the variant fits that GPU.")
    retried_from: str | None = Field(default=None, description="Pool of a first try that ran out of memory.")
    batch_images: int = Field(default=1, description="Images computed in the same pipeline call (batching).")
    created: int
    replied_at: float | None = Field(default=None, description=(
        "Epoch seconds when the replica handed the result over: the router's ``timings.to_router_s`` is from it."))

    def pil_images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(data)) for data in self.images]

    def to_openai(self, internals: bool = True) -> dict:
        """The OpenAI images response, plus imageserve's metadata next to it. ``internals``: also where it ran
        and its stage timings (replica, pool, GPU class, queue time), which a multi-tenant endpoint hides:
        they show other callers' load."""
        return self._openai_fields(internals, [pybase64.b64encode_as_string(data) for data in self.images])

    def openai_body(self, internals: bool = True) -> bytes:
        """``to_openai`` as the JSON bytes Starlette's ``JSONResponse`` would write for it, byte for byte, with
        each image's base64 spliced in: megabytes are written once, by pybase64's SIMD codec (0.05 ms for a
        2.47 MB PNG), never escaped by ``json.dumps`` or re-validated (issue 31: the router's body took 19.5 ms
        for that PNG before). The placeholder is found by its exact bytes: inside a JSON string its quotes
        would be escaped."""
        hole = b'"b64_json":""'
        pieces = _json_bytes(self._openai_fields(internals, [""] * len(self.images))).split(hole)
        assert len(pieces) == len(self.images) + 1, "one placeholder per image"
        spliced = [pieces[0]]
        for data, rest in zip(self.images, pieces[1:], strict=True):
            spliced += [b'"b64_json":"', pybase64.b64encode(data), b'"', rest]
        return b"".join(spliced)

    def _openai_fields(self, internals: bool, texts: list[str]) -> dict:
        answer = {
            "created": self.created,
            "data": [
                {"b64_json": text, "seed": seed, "revised_prompt": None}
                for text, seed in zip(texts, self.seeds, strict=True)
            ],
            "model": self.variant,
            "background": "opaque",
            "output_format": self.output_format,
            "quality": self.quality,
            "size": f"{self.width}x{self.height}",
            "usage": self.usage.model_dump() if self.usage else None,
            "seeds": self.seeds,
            "num_inference_steps": self.num_inference_steps,
        }
        if internals:
            answer.update({"timings": self.timings, "replica": self.replica, "gpu_class": self.gpu_class,
                           "pool": self.pool, "retried_from": self.retried_from, "batch_images": self.batch_images})
        return answer


def _json_bytes(content: object) -> bytes:
    """JSON as Starlette's ``JSONResponse.render`` writes it (compact, UTF-8, no NaN)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


# ---- model cards (GET /v1/models) ------------------------------------------------------------------------------


class SizeRange(TypedDict):
    min_side: int
    max_side: int
    multiple_of: int  # the pipeline family's (serve_app/domain/families.py)


class PlannedAt(TypedDict):
    size: str  # 'WIDTHxHEIGHT' the VRAM figures are planned at: the deployment's default size
    input_images: int


class GpuClassFit(TypedDict):
    gpu_class: str
    offload_mode: str
    peak_vram_gib: float


class PoolReplicas(TypedDict):
    pool: str
    gpu_class: str | None
    deployment: str
    replicas: int


class _ModelCardInternals(TypedDict, total=False):
    # Where it runs, shown only with serving.show_internals (other tenants' placement and load).
    pools: list[PoolReplicas]
    replicas: int
    unavailable_reason: str


class ModelCard(_ModelCardInternals):
    """A variant as ``GET /v1/models`` lists it: what the catalog and the planner say, the same for every caller,
    and whether this deployment serves it."""

    id: str
    object: Literal["model"]
    owned_by: str
    task: str  # its tasks joined by "+" ("generate+edit" for a family that does both)
    tasks: list[str]
    base_model: str
    precision: str
    svdq_rank: int | None
    default_steps: int
    max_input_images: int
    size_range: SizeRange
    default_size: str
    loras: list[str]
    vram_planned_at: PlannedAt
    vram_gib: dict[str, float]  # offload mode -> planned peak
    gpu_classes: list[GpuClassFit]
    served: bool


class _AliasCardInternals(TypedDict, total=False):
    resolves_to: dict[str, str] | None  # pool -> the variant the alias lands on there


class AliasCard(_AliasCardInternals):
    """An alias as ``GET /v1/models`` lists it."""

    id: str
    object: Literal["model"]
    owned_by: str
    task: str
    alias_for: list[str]
    served: bool
