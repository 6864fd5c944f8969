"""Decoding untrusted input images: a format allow-list, and a pixel cap checked from the header."""

from __future__ import annotations

import io

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


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
