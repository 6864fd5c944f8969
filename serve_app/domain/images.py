"""Images in and out: decoding untrusted input (a format allow-list, a pixel cap checked from the header),
and encoding output arrays in the format a request asks for."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

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
    except Image.DecompressionBombError as err:
        claimed = re.search(r"\((\d+) pixels\)", str(err))  # Pillow names the pixel count, not the size
        what = f"claims {int(claimed.group(1)) / 1e6:.1f} MP" if claimed else "claims more pixels than can be decoded"
        raise BadImageError(f"{name} {what}, over the {max_pixels / 1e6:.1f} MP limit", param="image") from None
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
    """Fully decode ``data`` to sRGB RGB, upright, after :func:`open_image`'s checks.

    A phone photo stores its pixels sideways with an EXIF orientation, and a wide-gamut one (Display P3,
    Adobe RGB) its colours in its own ICC profile; the models were trained on upright sRGB.
    """
    image = open_image(data, max_pixels, name)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name} is truncated or corrupt: {err}", param="image") from None
    return _to_srgb(image)


def _to_srgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if not icc:
        return image.convert("RGB")
    source = image if image.mode in ("RGB", "CMYK", "L") else image.convert("RGB")
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(source, profile, _SRGB, outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return image.convert("RGB")  # an unreadable profile: the pixels as they are, as browsers show them


_SRGB = ImageCms.createProfile("sRGB")


def limit_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb limit, for every image any library opens in this process (Pillow
    refuses past twice it); ``open_image`` checks each request's images against ``max_pixels`` itself."""
    Image.MAX_IMAGE_PIXELS = max_pixels


OutputFormat = Literal["png", "jpeg", "webp"]
# zlib level 1 (python -m bench.encoders, docs/benchmarks.md).
PNG_COMPRESS_LEVEL = 1
DEFAULT_OUTPUT_COMPRESSION = 100  # OpenAI's default: 0-100, as the JPEG/WEBP quality


def to_uint8(image: np.ndarray | Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a pipeline's float array in [0, 1] (or a PIL image), rounded as
    diffusers rounds (x 255, to nearest)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype == np.uint8:
        return image
    scaled = np.multiply(image, 255.0, dtype=np.float32)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(to_uint8(image))


def image_size(image: np.ndarray | Image.Image) -> tuple[int, int]:
    """(width, height) of an output image, array or PIL."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[1], image.shape[0]


# Deflate runs in parallel over bands of rows (zlib releases the GIL), as pigz does: each band ends on a
# byte boundary (sync flush) so the bands concatenate into one zlib stream.
_PNG_BANDS = max(1, min(4, os.cpu_count() or 1))
_deflaters = ThreadPoolExecutor(max_workers=_PNG_BANDS, thread_name_prefix="png-deflate")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png_rgb(pixels: np.ndarray, level: int = PNG_COMPRESS_LEVEL, bands: int = _PNG_BANDS) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array: the "Up" filter on every row, vectorised, then deflate
    with run-length matches only (zlib's Z_RLE) over ``bands`` bands of rows at once. On the filtered rows
    of a photo-like image LZ77's longer matches find little: RLE is about twice as fast and ~10 % smaller,
    and the whole is four times faster than Pillow at zlib level 1 (bench/encoders.py). Any PNG decoder
    reads it."""
    height, width, _ = pixels.shape
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the one above it
    rows = pixels.reshape(height, width * 3)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    edges = np.linspace(0, height, min(bands, height) + 1).astype(int)
    parts = [raw[start:end].tobytes() for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start]

    def deflate(i: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
        return compressor.compress(parts[i]) + compressor.flush(zlib.Z_FINISH if i == len(parts) - 1
                                                                else zlib.Z_SYNC_FLUSH)

    deflated = list(_deflaters.map(deflate, range(len(parts)))) if len(parts) > 1 else [deflate(0)]
    checksum = 1
    for part in parts:
        checksum = zlib.adler32(part, checksum)
    stream = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


PngWriter = Literal["imageserve", "pillow"]


def encode_image(image: np.ndarray | Image.Image, output_format: OutputFormat = "png",
                 output_compression: int | None = None, png_writer: PngWriter = "imageserve") -> bytes:
    """Encode one output image. ``output_compression`` (0-100, OpenAI's name) is the JPEG/WEBP quality.
    ``png_writer``: imageserve's own (``encode_png_rgb``), or Pillow with its defaults (the fallback)."""
    if output_format == "png" and png_writer == "imageserve":
        return encode_png_rgb(to_uint8(image))
    if output_format == "png":
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="PNG")
        return buffer.getvalue()
    buffer = io.BytesIO()
    quality = DEFAULT_OUTPUT_COMPRESSION if output_compression is None else output_compression
    to_pil(image).save(buffer, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    return encode_image(image, "png")
