"""Images in and out: decoding untrusted input under bounds, and encoding output arrays in the format a
request asks for.

An input image is decoded only after its bytes' structure has been walked and bounded (``check_structure``:
PNG chunks, JPEG segments and scans, WEBP chunks, pixels from the header), since Pillow's own work grows
with that structure, not with the file's size: a 726 KB progressive JPEG of 20,000 repeated 33-byte scans
took 25 s to decode, a 12 MB PNG of a million empty chunks 2.5 s to open (issue 27). A CPU-time budget
(``DecodeLimits.max_decode_cpu_s``) backs the walk up while Pillow decodes. The router decodes each input so,
in worker threads, and sends the replica the pixels re-encoded as a plain PNG (``prepare_input_image``).
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from zlib_ng import zlib_ng

from serve_app.domain.errors import BadImageError, ImageServeError, UnsupportedImageTypeError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096

# Bounds on an input's structure (measured with Pillow 13 / libjpeg-turbo 3, docs/security.md, issue 27):
# - JPEG scans: each scan costs a pass over every 8x8 block of the components it covers, even one of a few
#   bytes (1.4 ms per 33-byte scan at 4096x4096 here, against 0.1 s for the whole baseline decode). libjpeg's
#   standard progression (Pillow's progressive=True, jpegtran -progressive, ImageMagick) writes 10 scans, 18
#   for CMYK; 100 leaves room for any encoder's script and bounds the extra passes at ~0.15-0.3 s at 16 MP.
MAX_JPEG_SCANS = 100
# - PNG chunks, JPEG segments (markers) and WEBP chunks: Pillow spends ~2.3 us on each PNG chunk and ~1 us on
#   each JPEG segment before its first scan, however small. At most 1024, plus one per 4 KB of file: libpng
#   writes 8 KB image-data chunks and Pillow 64 KB ones, so a real file stays far below, and the walk Pillow
#   does is bounded by the file's size (a 50 MB file: ~13,000 chunks, ~30 ms) rather than 12 bytes a chunk.
BASE_CHUNKS = 1024
BYTES_PER_CHUNK = 4096
# - JPEG bytes outside every segment (junk, or 0xFF fill before a marker), which libjpeg skips with a warning
#   and Pillow's header parser steps over one at a time (0.25 us each).
MAX_JPEG_STRAY_BYTES = 64 * 1024
# - CPU seconds one image's decode may take (checked as Pillow reads its bytes): a backstop for what the
#   walk does not model. A 16 MP image takes 0.1-0.5 s here, a hundred-scan progressive one included.
MAX_DECODE_CPU_S = 5.0

# What decoding an input costs, in the megapixel-steps per-key limits count. Per input megapixel the service
# spends ~55 ms of CPU here: the router ~30 (decode 6-14 ms, re-encode 18), the replica ~23 (PNG decode 13 ms,
# the pipeline's resize 10) on its one pipeline thread, which the GPU waits on. At an H100's ~3.5 megapixel-steps
# a second for the edit models (80 in 23 s) the replica's part is ~0.08 of one: 0.1 rounds it up. Each JPEG
# scan past the first adds ~0.5 % (1.4 ms of the ~0.9 s a 16 MP input costs in all).
DECODE_COST_PER_MEGAPIXEL = 0.1
SCAN_DECODE_SHARE = 0.005

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WEBP_FIRST_CHUNKS = (b"VP8 ", b"VP8L", b"VP8X")  # Pillow's WEBP plugin accepts only these first


@dataclass(frozen=True)
class DecodeLimits:
    """What one input image may cost to decode: pixels, read from its header, and the structure Pillow walks,
    checked by ``check_structure`` before Pillow parses anything, with a CPU-time budget while it decodes."""

    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    max_scans: int = MAX_JPEG_SCANS
    base_chunks: int = BASE_CHUNKS
    bytes_per_chunk: int = BYTES_PER_CHUNK
    max_stray_bytes: int = MAX_JPEG_STRAY_BYTES
    max_decode_cpu_s: float = MAX_DECODE_CPU_S

    def max_chunks(self, size: int) -> int:
        """Chunks (PNG, WEBP) or segments (JPEG) a file of ``size`` bytes may hold."""
        return self.base_chunks + size // self.bytes_per_chunk


@dataclass(frozen=True)
class Structure:
    """What ``check_structure`` counted in an image's bytes."""

    format: str  # PNG, JPEG or WEBP
    chunks: int  # PNG chunks, JPEG segments (markers), WEBP chunks (frames' own included)
    scans: int   # JPEG scans; 1 for PNG and WEBP


@dataclass(frozen=True)
class InputImage:
    """One input image as its structure and header describe it, before any pixel is decoded."""

    format: str
    width: int
    height: int
    chunks: int
    scans: int
    nbytes: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def decode_cost(self) -> float:
        """What decoding it costs, in megapixel-steps (``DECODE_COST_PER_MEGAPIXEL``, ``SCAN_DECODE_SHARE``)."""
        return self.megapixels * (1 + SCAN_DECODE_SHARE * max(0, self.scans - 1)) * DECODE_COST_PER_MEGAPIXEL


def input_decode_cost(images: Sequence[InputImage]) -> float:
    """What a request's input images cost to decode, in megapixel-steps: the term a request's cost adds for
    them on top of ``GenerateRequest.cost`` (whose ``(1 + input images)`` counts their latents on the GPU)."""
    return sum(image.decode_cost for image in images)


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP by the leading bytes Pillow's plugins accept, or None."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP" and data[12:16] in _WEBP_FIRST_CHUNKS:
        return "WEBP"
    return None


def _unsupported(name: str) -> UnsupportedImageTypeError:
    return UnsupportedImageTypeError(
        f"{name} is not a PNG, JPEG or WEBP image (the file's bytes decide, not its name or content type)",
        param="image")


def check_structure(data: bytes, limits: DecodeLimits = DecodeLimits(), name: str = "image") -> Structure:
    """Walk ``data``'s PNG chunks, JPEG segments and scans, or WEBP chunks without decoding anything, and refuse
    it (BadImageError, naming the limit) past ``limits``. The walk follows the structure as Pillow and libjpeg
    read it, stops at the end marker (what follows is never read) or where the bytes run out (the decoder
    then finds the file truncated), and costs at most the bounded number of steps, in C-speed searches."""
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(name)
    walk = {"PNG": _walk_png, "JPEG": _walk_jpeg, "WEBP": _walk_webp}[fmt]
    chunks, scans = walk(data, limits, name)
    return Structure(fmt, chunks, scans)


def _too_many_chunks(name: str, kind: str, data: bytes, limits: DecodeLimits) -> BadImageError:
    return BadImageError(
        f"{name} has more than {limits.max_chunks(len(data))} {kind}, the limit for a file of {len(data) / 1e6:.1f}"
        f" MB ({limits.base_chunks} plus one per {limits.bytes_per_chunk // 1024} KB)", param="image")


def _walk_png(data: bytes, limits: DecodeLimits, name: str) -> tuple[int, int]:
    bound = limits.max_chunks(len(data))
    pos, chunks = len(_PNG_SIGNATURE), 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if chunks > bound:
            raise _too_many_chunks(name, "PNG chunks", data, limits)
        if kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    return chunks, 1


# A JPEG marker: 0xFF (and any fill 0xFF bytes) then a byte that is neither 0 (a stuffed 0xFF) nor 0xFF.
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")
# What ends a scan's entropy-coded data: a marker other than RST0-7, which libjpeg handles inside the scan.
_JPEG_SCAN_END = re.compile(rb"\xff+([^\x00\xff\xd0-\xd7])")
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA
_JPEG_NO_LENGTH = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length field


def _walk_jpeg(data: bytes, limits: DecodeLimits, name: str) -> tuple[int, int]:
    bound = limits.max_chunks(len(data))
    pos, segments, scans, stray = 2, 1, 0, 0  # past SOI
    pattern = _JPEG_MARKER
    while (found := pattern.search(data, pos)) is not None:
        if pattern is _JPEG_MARKER:  # junk and extra fill bytes before it; entropy-coded data is not stray
            stray += found.end() - 2 - pos
            if stray > limits.max_stray_bytes:
                raise BadImageError(f"{name} has more than {limits.max_stray_bytes // 1024} KB of stray bytes "
                                    "between its JPEG segments, the limit", param="image")
        marker, pos, pattern = found.group(1)[0], found.end(), _JPEG_MARKER
        segments += 1
        if segments > bound:
            raise _too_many_chunks(name, "JPEG segments", data, limits)
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_NO_LENGTH:
            continue
        if pos + 2 > len(data):
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            raise BadImageError(f"{name} is a corrupt JPEG (a segment of length {length})", param="image")
        if marker == _JPEG_SOS:
            scans += 1
            if scans > limits.max_scans:
                raise BadImageError(f"{name} is a JPEG of more than {limits.max_scans} scans, the limit (a "
                                    "progressive JPEG has about 10)", param="image")
            pattern = _JPEG_SCAN_END
        pos += length
    return segments, scans


def _walk_webp(data: bytes, limits: DecodeLimits, name: str) -> tuple[int, int]:
    bound = limits.max_chunks(len(data))
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))  # libwebp reads no further than RIFF's size
    chunks = 0

    def walk(pos: int, stop: int) -> None:
        nonlocal chunks
        while pos + 8 <= stop:
            kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
            chunks += 1
            if chunks > bound:
                raise _too_many_chunks(name, "WEBP chunks", data, limits)
            if kind == b"ANMF":  # an animation frame: a 16-byte header, then the frame's own chunks
                walk(pos + 8 + 16, min(stop, pos + 8 + size))
            pos += 8 + size + (size & 1)

    walk(12, end)
    return chunks, 1


class _BudgetedBytes(io.BytesIO):
    """The bytes Pillow reads an image from, refusing (BadImageError) once ``budget_s`` of ``clock`` (this
    thread's CPU time) has passed since it was made: Pillow reads as it decodes, 64 KB at a time, so a decode
    past the budget stops at its next read."""

    def __init__(self, data: bytes, budget_s: float, clock: Callable[[], float], name: str) -> None:
        super().__init__(data)
        self._clock, self._budget_s, self._name = clock, budget_s, name
        self._deadline = clock() + budget_s

    def read(self, size: int | None = -1) -> bytes:
        if self._clock() > self._deadline:
            raise BadImageError(f"{self._name} takes more than {self._budget_s:g} s of CPU to decode, the limit",
                                param="image")
        return super().read(size)


def _open(data: bytes, limits: DecodeLimits, name: str,
          source: io.BytesIO | None = None) -> tuple[Image.Image, Structure]:
    if not data:
        raise BadImageError(f"{name} is empty", param="image")
    structure = check_structure(data, limits, name)
    max_pixels = limits.max_pixels
    try:
        image = Image.open(source or io.BytesIO(data), formats=ALLOWED_FORMATS)
    except ImageServeError:
        raise
    except Image.DecompressionBombError as err:
        claimed = re.search(r"\((\d+) pixels\)", str(err))  # Pillow names the pixel count, not the size
        what = f"claims {int(claimed.group(1)) / 1e6:.1f} MP" if claimed else "claims more pixels than can be decoded"
        raise BadImageError(f"{name} {what}, over the {max_pixels / 1e6:.1f} MP limit", param="image") from None
    except UnidentifiedImageError:
        raise _unsupported(name) from None
    except Exception as err:  # noqa: BLE001 - whatever Pillow raises on hostile bytes is the caller's bad image
        raise BadImageError(f"{name} cannot be read: {err}", param="image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(
            f"{name} is {width}x{height} ({width * height / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit",
            param="image",
        )
    return image, structure


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, name: str = "image", *,
               limits: DecodeLimits | None = None) -> Image.Image:
    """Open ``data`` lazily (header only) after checking its format, its structure and its pixel count.

    ``check_structure`` bounds what Pillow's header parser walks; Pillow then reads only the header, so a
    decompression bomb (a small file claiming 20000x20000) is refused before any pixel is decoded.
    ``limits`` (``DecodeLimits``), when given, sets the pixel cap in place of ``max_pixels``.
    """
    return _open(data, limits or DecodeLimits(max_pixels=max_pixels), name)[0]


def inspect_image(data: bytes, limits: DecodeLimits = DecodeLimits(), name: str = "image") -> InputImage:
    """What an input image is and costs to decode, from its structure and header alone (``open_image``'s
    checks): cheap, bounded, and decoding no pixel."""
    image, structure = _open(data, limits, name)
    return InputImage(structure.format, *image.size, structure.chunks, structure.scans, len(data))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, name: str = "image", *,
                 limits: DecodeLimits | None = None,
                 clock: Callable[[], float] = time.thread_time) -> Image.Image:
    """Fully decode ``data`` to sRGB RGB, upright, after :func:`open_image`'s checks, within ``limits``'
    CPU-time budget (``clock``: this thread's CPU seconds; tests pass their own).

    A phone photo stores its pixels sideways with an EXIF orientation, and a wide-gamut one (Display P3,
    Adobe RGB) its colours in its own ICC profile; the models were trained on upright sRGB.
    """
    limits = limits or DecodeLimits(max_pixels=max_pixels)
    image, _ = _open(data, limits, name, _BudgetedBytes(data, limits.max_decode_cpu_s, clock, name))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except ImageServeError:
        raise
    except Exception as err:  # noqa: BLE001 - as in _open: hostile bytes, whatever Pillow makes of them
        raise BadImageError(f"{name} is truncated or corrupt: {err}", param="image") from None
    return _to_srgb(image)


def prepare_input_image(data: bytes, limits: DecodeLimits = DecodeLimits(), name: str = "image") -> bytes:
    """``data`` decoded under ``limits`` (``decode_image``: sRGB, upright) and re-encoded as a plain 8-bit RGB
    PNG (``encode_png_rgb``: one image-data chunk, no metadata): what the router sends a replica in place of
    the caller's bytes, so that the pipeline's thread decodes nothing it has not been handed by the router."""
    return encode_png_rgb(np.asarray(decode_image(data, name=name, limits=limits)))


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
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib_ng.crc32(tag + data))


def encode_png_rgb(pixels: np.ndarray, level: int = PNG_COMPRESS_LEVEL, bands: int = _PNG_BANDS,
                   deflater=zlib_ng) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array: the "Up" filter on every row, vectorised, then deflate
    with run-length matches only (Z_RLE) over ``bands`` bands of rows at once. On the filtered rows of a
    photo-like image LZ77's longer matches find little: RLE is about twice as fast and ~10 % smaller. The
    deflate is zlib-ng's (its own stream format is zlib's): its RLE and checksums are vectorised, 1.8x
    the stdlib zlib's RLE on the same rows with the same bytes out (bench/encoders.py). It releases the GIL
    as zlib does, so the bands run in parallel. Any PNG decoder reads the result. ``deflater``: the module
    whose ``compressobj`` and ``adler32`` run (the stdlib ``zlib`` for the benchmark's side-by-side row)."""
    height, width, _ = pixels.shape
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the one above it
    rows = pixels.reshape(height, width * 3)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    edges = np.linspace(0, height, min(bands, height) + 1).astype(int)
    parts = [raw[start:end].tobytes() for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start]

    def deflate(i: int) -> bytes:
        compressor = deflater.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
        return compressor.compress(parts[i]) + compressor.flush(zlib.Z_FINISH if i == len(parts) - 1
                                                                else zlib.Z_SYNC_FLUSH)

    deflated = list(_deflaters.map(deflate, range(len(parts)))) if len(parts) > 1 else [deflate(0)]
    checksum = 1
    for part in parts:
        checksum = deflater.adler32(part, checksum)
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
