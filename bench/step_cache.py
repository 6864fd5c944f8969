"""Step caching: transformer forwards saved per image, and the pixel difference against the uncached image.

The tiny Qwen-Image-Edit-2509 pipeline (random weights, the real classes), one edit of a fixed image with a
fixed seed, run plain and with each step cache (diffusers' first-block cache at several thresholds,
TaylorSeer at several intervals) through the serving engine. A "full forward" is one in which the last
transformer block's attention computed (its ``to_q`` ran): first-block cache skips every block after the
first, TaylorSeer predicts the attention outputs, and either way that projection does not run. The
difference is in 8-bit pixel values: mean and largest absolute difference, and PSNR.

Random weights move between steps unlike trained ones, so which settings skip how much here says nothing
about a real checkpoint; what carries over is the bookkeeping (forwards saved against pixels changed) and
that the path works. On a GPU the same run with real weights is the one to trust.

    .venv/bin/python -m bench.step_cache [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.common import bench_parser, photo_png, pixel_difference, run_reporting
from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import parse_config
from serve_app.domain.schemas import EditRequest
from serve_app.domain.specs import engine_spec
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.protocol import Job
from serve_app.engines.random_weights import build_all

VARIANT = "qwen-image-edit-2509"
SETTINGS: list[tuple[str, dict[str, Any] | None]] = [
    ("none", None),
    *((f"first_block {t:g}", {"kind": "first_block", "threshold": t}) for t in (0.05, 0.1, 0.2, 0.4)),
    *((f"taylorseer every {n}", {"kind": "taylorseer", "cache_interval": n, "disable_cache_before_step": 3})
      for n in (3, 5)),
]



def edit_once(tiny_dir: Path, cache: dict[str, Any] | None, steps: int, png: bytes) -> tuple[np.ndarray, int, int]:
    """The edited image, the full forwards counted and the forwards a plain run makes (CFG doubles them)."""
    catalog = default_catalog()
    model = {**tiny_model_config(tiny_dir, catalog.variant(VARIANT)),
             "optimizations": {"step_cache": cache} if cache else {}}
    config = parse_config({"device": {"device": "cpu"}, "hf": {"offline": True}, "models": {VARIANT: model}})
    engine = load_engine(engine_spec(config, catalog.variant(VARIANT), catalog))
    full = [0]
    engine.pipe.transformer.transformer_blocks[-1].attn.to_q.register_forward_hook(
        lambda *_: full.__setitem__(0, full[0] + 1))
    request = EditRequest(prompt="make it blue", images=[png], seed=3, num_inference_steps=steps,
                          negative_prompt="blurry", true_cfg_scale=4.0)
    (result,) = engine.run([Job(request, 64, 64, steps)], should_stop=lambda: False)
    plain = steps * (2 if engine.variant.runs_cfg(true_cfg_scale=4.0, negative_prompt="blurry") else 1)
    return np.asarray(result.images[0], dtype=np.float64), full[0], plain


def run(args: argparse.Namespace, out: TextIO) -> int:
    tiny_dir = Path(tempfile.gettempdir()) / "imageserve-bench-tiny"
    build_all(tiny_dir)
    png = photo_png()
    reference, _, _ = edit_once(tiny_dir, None, args.steps, png)
    rows = []
    for name, cache in SETTINGS:
        image, full, plain = edit_once(tiny_dir, cache, args.steps, png)
        rows.append({"setting": name, "full_forwards": full, "plain_forwards": plain,
                     "saved_share": 1 - full / plain, **pixel_difference(image, reference)})
    if args.json:
        print(json.dumps({"variant": VARIANT, "steps": args.steps, "rows": rows}), file=out)
        return 0
    print(f"{VARIANT} (tiny), {args.steps} steps with CFG, 64x64", file=out)
    print(f"  {'setting':<20} {'full forwards':>14} {'saved':>6} {'mean |d|':>9} {'max |d|':>8} {'PSNR dB':>8}",
          file=out)
    for row in rows:
        print(f"  {row['setting']:<20} {row['full_forwards']:>7}/{row['plain_forwards']:<6} "
              f"{row['saved_share']:>6.0%} {row['mean_abs_diff']:>9.2f} {row['max_abs_diff']:>8.2f} "
              f"{row['psnr_db']:>8.1f}", file=out)
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20)
    return run_reporting(parser.parse_args(), run)


if __name__ == "__main__":
    raise SystemExit(main())
