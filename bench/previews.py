"""What stream previews (``partial_images``) cost the denoising they show.

Three measurements, side by side in one run:

1. **Denoising with and without previews**, the real ZImagePipeline on the tiny checkpoint: the same call
   (size, steps, seed) with no hook and with ``partial_images=3``, alternated, median seconds per step.
   The preview work on the pipeline's thread is the clean-image estimate and the latent-to-RGB map.
2. **That work at full size**: the hook on latent grids of the real models at 1024x1024 (Z-Image-Turbo:
   16 x 128 x 128; Qwen-Image-Edit: 4,096 packed patches of 64), on this CPU, against the one thing it
   replaces, a VAE decode (the tiny VAE's here; a real one is far larger).
3. **Encoding a preview** at 1024x1024 (scale up + PNG / JPEG), which runs in the encoder threads,
   beside the pipeline's thread, not on it.

    .venv/bin/python -m bench.previews [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def denoising_with_and_without(root: Path, side: int, steps: int, repeats: int) -> dict:
    from serve_app.domain.config import parse_config
    from serve_app.domain.schemas import GenerateRequest, preview_steps
    from serve_app.domain.specs import engine_spec
    from serve_app.engines import load_engine
    from serve_app.engines.protocol import Job

    config = parse_config({"device": {"device": "cpu"}, "models": {"z-image-turbo": {"source": str(root)}}})
    catalog = config.build_catalog()
    engine = load_engine(engine_spec(config, catalog.variant("z-image-turbo"), catalog))
    engine.latent_rgb()
    request = GenerateRequest(prompt="a lighthouse at dusk", seed=1)
    wanted = preview_steps(steps, 3)

    def plain():
        engine.run([Job(request, side, side, steps)], should_stop=lambda: False)

    def streamed():
        engine.run([Job(request, side, side, steps, preview_steps=wanted, on_preview=lambda *a: None)],
                   should_stop=lambda: False)

    plain()
    streamed()  # warm both paths
    plain_s, streamed_s = [], []
    for _ in range(repeats):  # alternated, so drift on a shared machine hits both alike
        plain_s.append(_median_seconds(plain, 1))
        streamed_s.append(_median_seconds(streamed, 1))
    per_step = statistics.median(plain_s) / steps
    return {"size": f"{side}x{side}", "steps": steps, "previews": len(wanted),
            "plain_s_per_step": per_step, "streamed_s_per_step": statistics.median(streamed_s) / steps,
            "slowdown": statistics.median(streamed_s) / statistics.median(plain_s)}


def hook_at_full_size(root: Path, repeats: int) -> dict:
    from diffusers import AutoencoderKL

    from serve_app.engines.previews import LatentPreviewer

    matrix = torch.randn(17, 3)
    sigmas = torch.linspace(1, 0, 9)

    def engine(grid):
        return SimpleNamespace(pipe=SimpleNamespace(scheduler=SimpleNamespace(sigmas=sigmas)),
                               latent_grid=grid, latent_rgb=lambda: matrix)

    z_image = LatentPreviewer(engine(lambda x, w, h: x), [4], lambda *a: None, 1024, 1024)
    qwen = LatentPreviewer(engine(lambda x, w, h: x.view(1, 64, 64, 16, 2, 2).permute(0, 3, 1, 4, 2, 5)
                                  .reshape(1, 16, 128, 128)), [4], lambda *a: None, 1024, 1024)
    grid, packed = torch.randn(1, 16, 128, 128), torch.randn(1, 4096, 64)
    z_image.previous, qwen.previous = grid + 0.1, packed + 0.1
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    latents = torch.randn(1, vae.config.latent_channels, 128, 128)
    with torch.inference_mode():
        decode_s = _median_seconds(lambda: vae.decode(latents), max(1, repeats // 3))
        z_s = _median_seconds(lambda: z_image.previews(z_image.clean_estimate(4, grid)), repeats)
        qwen_s = _median_seconds(lambda: qwen.previews(qwen.clean_estimate(4, packed)), repeats)
    return {"z_image_hook_s": z_s, "qwen_hook_s": qwen_s, "tiny_vae_decode_s": decode_s,
            "decode_over_hook": decode_s / z_s}


def encoding(repeats: int) -> dict:
    import numpy as np
    from PIL import Image

    from serve_app.domain.images import encode_image, to_pil

    preview = np.random.default_rng(0).random((128, 128, 3), dtype=np.float32)
    out = {}
    for fmt in ("png", "jpeg"):
        out[f"{fmt}_s"] = _median_seconds(lambda fmt=fmt: encode_image(
            to_pil(preview).resize((1024, 1024), Image.Resampling.BILINEAR), fmt), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from serve_app.engines.random_weights import build_all

    with tempfile.TemporaryDirectory() as folder:
        root = build_all(Path(folder))["z-image-turbo"]
        result = {"denoising": denoising_with_and_without(root, 256, 12, args.repeats),
                  "hook_1024": hook_at_full_size(root, args.repeats * 4),
                  "encode_1024": encoding(args.repeats)}
    if args.json:
        print(json.dumps(result))
        return
    d, h, e = result["denoising"], result["hook_1024"], result["encode_1024"]
    print(f"tiny Z-Image {d['size']}, {d['steps']} steps, {d['previews']} previews: "
          f"{d['plain_s_per_step'] * 1e3:.1f} ms/step plain, {d['streamed_s_per_step'] * 1e3:.1f} streamed "
          f"(x{d['slowdown']:.3f})")
    print(f"hook at 1024x1024 on this CPU: Z-Image {h['z_image_hook_s'] * 1e3:.2f} ms, Qwen packed "
          f"{h['qwen_hook_s'] * 1e3:.2f} ms; tiny VAE decode {h['tiny_vae_decode_s'] * 1e3:.1f} ms "
          f"(x{h['decode_over_hook']:.0f} the hook)")
    print(f"encoding a 1024x1024 preview (encoder threads): png {e['png_s'] * 1e3:.1f} ms, "
          f"jpeg {e['jpeg_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
