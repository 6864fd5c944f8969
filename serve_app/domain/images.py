"""Images in and out: decoding untrusted input (a format allow-list, a pixel cap checked from the header),
and encoding output arrays in the format a request asks for."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve_app.domain.errors import BadImageError, UnsupportedImageTypeError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, name: str = "image") -> Image.Image:
    """Open ``data`` lazily (header only) after checking its format and pixel count.

    Pillow reads only the header here, so a decompression bomb (a small file claiming
    20000x20000) is refused before any pixel is decoded.
    """
    if not data:
        raise BadImageError(f"{name} is empty", param="image")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise BadImageError(
            f"{name} claims more pixels than can be decoded safely (over the {max_pixels / 1e6:.1f} MP limit)",
            param="image",
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedImageTypeError(
            f"{name} is not a PNG, JPEG or WEBP image (the file's bytes decide, not its name or content type)",
            param="image",
        ) from None
    except (OSError, ValueError) as err:
        raise BadImageError(f"{name} cannot be read: {err}", param="image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(
            f"{name} is {width}x{height} ({width * height / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit",
            param="image",
        )
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, name: str = "image") -> Image.Image:
    """Fully decode ``data`` to RGB after :func:`open_image`'s checks."""
    image = open_image(data, max_pixels, name)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name} is truncated or corrupt: {err}", param="image") from None
    return image.convert("RGB")


OutputFormat = Literal["png", "jpeg", "webp"]
# zlib level 1: a photo-like 1024x1024 image in ~0.2 s instead of ~0.4 s at Pillow's default 6, for a file
# 13 % larger (python -m bench.encoders, docs/benchmarks.md).
PNG_COMPRESS_LEVEL = 1
DEFAULT_OUTPUT_COMPRESSION = 100  # OpenAI's default: 0-100, as the JPEG/WEBP quality


def to_uint8(image: np.ndarray | Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a pipeline's float array in [0, 1] (or a PIL image)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(to_uint8(image))


def image_size(image: np.ndarray | Image.Image) -> tuple[int, int]:
    """(width, height) of an output image, array or PIL."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[1], image.shape[0]


def encode_image(image: np.ndarray | Image.Image, output_format: OutputFormat = "png",
                 output_compression: int | None = None, png_compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode one output image. ``output_compression`` (0-100, OpenAI's name) is the JPEG/WEBP quality."""
    pil = to_pil(image)
    buffer = io.BytesIO()
    if output_format == "png":
        pil.save(buffer, format="PNG", compress_level=png_compress_level)
    else:
        quality = DEFAULT_OUTPUT_COMPRESSION if output_compression is None else output_compression
        pil.save(buffer, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    return encode_image(image, "png")
