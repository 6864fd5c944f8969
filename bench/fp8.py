"""fp8 variants against full precision: the transformer's weight bytes, and the pixel difference of one image.

The tiny Z-Image-Turbo and Qwen-Image-Edit-2511 pipelines (random weights, the real classes), loaded through the
serving engine twice from the same checkpoint: as the full-precision variant and as its fp8 variant (torchao
quantizes the transformer at load). Weight bytes are the transformer's parameters and buffers as stored, fp8
data and scales included. The difference is in 8-bit pixel values: mean and largest absolute difference, and
PSNR, for the same prompt, image and seed.

On CPU torchao runs fp8 weight-only (fp8 weights widened per layer), so this measures memory and numerics, not
speed; on a GPU (sm_89 and newer) the fp8 variants run fp8 matmuls, and bench/gpu_fullsize.py
(`--variants z-image-turbo-fp8,qwen-image-edit-2511-fp8`) measures their time and memory at full size.

    .venv/bin/python -m bench.fp8 [--steps 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.common import bench_parser, photo_png, pixel_difference, run_reporting
from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import parse_config
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.protocol import Job
from serve_app.engines.random_weights import build_all

PAIRS = [("z-image-turbo", "z-image-turbo-fp8"), ("qwen-image-edit-2511", "qwen-image-edit-2511-fp8")]



def stored_bytes(module) -> int:
    """Bytes of a module's weights as stored: torchao's fp8 tensors count their fp8 data and their scales."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        parts = [getattr(tensor, name) for name in ("qdata", "scale") if hasattr(tensor, name)] or [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def image_and_bytes(tiny_dir: Path, variant_id: str, steps: int, png: bytes) -> tuple[np.ndarray, int]:
    catalog = default_catalog()
    variant = catalog.variant(variant_id)
    config = parse_config({"device": {"device": "cpu"}, "hf": {"offline": True},
                           "models": {variant_id: tiny_model_config(tiny_dir, variant)}})
    engine = load_engine(engine_spec(config, variant, catalog))
    if variant.tasks == ("generate",):
        request = GenerateRequest(prompt="a lighthouse at dusk", seed=3, num_inference_steps=steps)
    else:
        request = EditRequest(prompt="make it blue", images=[png], seed=3, num_inference_steps=steps)
    (result,) = engine.run([Job(request, 64, 64, steps)], should_stop=lambda: False)
    return np.asarray(result.images[0], dtype=np.float64), stored_bytes(engine.pipe.transformer)


def run(args: argparse.Namespace, out: TextIO) -> int:
    tiny_dir = Path(tempfile.gettempdir()) / "imageserve-bench-tiny"
    build_all(tiny_dir)
    png = photo_png()
    rows = []
    for full_id, fp8_id in PAIRS:
        reference, full_bytes = image_and_bytes(tiny_dir, full_id, args.steps, png)
        image, fp8_bytes = image_and_bytes(tiny_dir, fp8_id, args.steps, png)
        rows.append({"variant": fp8_id, "against": full_id, "transformer_bytes": fp8_bytes,
                     "full_transformer_bytes": full_bytes, "bytes_ratio": fp8_bytes / full_bytes,
                     **pixel_difference(image, reference)})
    if args.json:
        print(json.dumps({"steps": args.steps, "rows": rows}), file=out)
        return 0
    print(f"tiny checkpoints on CPU (float32 against fp8 weight-only), {args.steps} steps, 64x64", file=out)
    print(f"  {'variant':<26} {'transformer MB':>15} {'ratio':>6} {'mean |d|':>9} {'max |d|':>8} {'PSNR dB':>8}",
          file=out)
    for row in rows:
        sizes = f"{row['transformer_bytes'] / 1e6:>6.2f} / {row['full_transformer_bytes'] / 1e6:<6.2f}"
        print(f"  {row['variant']:<26} {sizes} {row['bytes_ratio']:>6.3f} {row['mean_abs_diff']:>9.2f} "
              f"{row['max_abs_diff']:>8.2f} {row['psnr_db']:>8.1f}", file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=8)
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    raise SystemExit(main())
