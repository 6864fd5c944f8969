"""Output image encoders, side by side on one photo-like 1024x1024 image: seconds per image and bytes.

Compares what the replica can encode with: Pillow's PNG at zlib levels 6 (its default), 1 and 0,
imageserve's own PNG writer (``serve_app.domain.images.encode_png_rgb``: the Up filter vectorised,
zlib-ng's run-length deflate over bands of rows in parallel; also with the stdlib zlib, as it was before
zlib-ng), JPEG and WEBP at OpenAI's output_compression 100 and 90, and, where installed, OpenCV's PNG
and JPEG, imagecodecs' PNG (zlib-ng) and fpng (``pip install fpng``). Then the base64 of imageserve's PNG,
the answer's ``b64_json``, by the stdlib and by pybase64. The replica's choices come from this table
(docs/benchmarks.md).

    .venv/bin/python -m bench.encoders [--size 1024] [--repeats 5] [--json]
"""

from __future__ import annotations

import io
import statistics
import sys
import time

from bench.common import bench_parser, run_reporting


def pillow(fmt: str, **options):
    from PIL import Image

    def encode(pixels) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return encode


def optional_encoders() -> dict:
    """Encoders from libraries imageserve does not depend on, if this machine has them."""
    found = {}
    try:
        import cv2

        def opencv(ext: str, params: list[int]):
            def encode(pixels) -> bytes:
                ok, data = cv2.imencode(ext, pixels[:, :, ::-1], params)
                return data.tobytes()
            return encode

        found["opencv png level 1"] = opencv(".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])
        found["opencv jpeg q90"] = opencv(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])
    except ImportError:
        pass
    try:
        import imagecodecs

        found["imagecodecs png level 1"] = lambda pixels: imagecodecs.png_encode(pixels, level=1)
    except ImportError:
        pass
    try:
        import fpng

        found["fpng"] = fpng.from_ndarray
    except ImportError:
        pass
    return found


def encoders() -> dict:
    import zlib

    from serve_app.domain.images import encode_png_rgb

    return {
        "pillow png level 6 (Pillow's default)": pillow("PNG"),
        "pillow png level 1": pillow("PNG", compress_level=1),
        "pillow png level 0": pillow("PNG", compress_level=0),
        "imageserve png, stdlib zlib, 1 band": lambda pixels: encode_png_rgb(pixels, bands=1, deflater=zlib),
        "imageserve png, stdlib zlib (all bands)": lambda pixels: encode_png_rgb(pixels, deflater=zlib),
        "imageserve png, zlib-ng, 1 band": lambda pixels: encode_png_rgb(pixels, bands=1),
        "imageserve png, zlib-ng (all bands)": encode_png_rgb,
        "pillow jpeg q100 (OpenAI's default)": pillow("JPEG", quality=100),
        "pillow jpeg q90": pillow("JPEG", quality=90),
        "pillow webp q100": pillow("WEBP", quality=100),
        "pillow webp q90": pillow("WEBP", quality=90),
        **optional_encoders(),
    }


def base64_codecs() -> dict:
    """The base64 of an answer's image: the stdlib's, and pybase64's (SIMD), which the replica uses."""
    import base64

    import pybase64

    return {"base64 of that PNG, stdlib": base64.b64encode, "base64 of that PNG, pybase64": pybase64.b64encode}


def median_ms(call, data, repeats: int) -> tuple[float, bytes]:
    """The median milliseconds of ``call(data)`` over ``repeats`` runs after one warm-up, and its output."""
    call(data)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = call(data)
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds), out


def run(args, out) -> int:
    from serve_app.domain.images import encode_png_rgb, to_uint8
    from serve_app.engines.gpu_doubles import photo_like_image

    pixels = to_uint8(photo_like_image(args.size, args.size))
    rows = {}
    for name, encode in encoders().items():
        ms, data = median_ms(encode, pixels, args.repeats)
        rows[name] = {"ms": round(ms, 1), "bytes": len(data)}
    png = encode_png_rgb(pixels)
    for name, codec in base64_codecs().items():  # the answer's b64_json text of imageserve's PNG
        ms, data = median_ms(codec, png, args.repeats)
        rows[name] = {"ms": round(ms, 3), "bytes": len(data), "speedup_over_pillow_default": None}  # not an encoder
    baseline = rows["pillow png level 6 (Pillow's default)"]["ms"]
    for row in rows.values():
        if "speedup_over_pillow_default" not in row:
            row["speedup_over_pillow_default"] = round(baseline / row["ms"], 1)
    if args.json:
        import json

        print(json.dumps({"size": args.size, "encoders": rows}, indent=2), file=out)
        return 0
    print(f"{args.size}x{args.size} photo-like image, median of {args.repeats}", file=out)
    print(f"{'encoder':<40} {'ms':>8} {'KB':>8} {'x faster than Pillow PNG':>26}", file=out)
    for name, row in rows.items():
        speedup = row["speedup_over_pillow_default"]
        print(f"{name:<40} {row['ms']:>8.2f} {row['bytes'] / 1024:>8.0f} {'' if speedup is None else speedup:>26}",
              file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
