"""Cheap previews of an image while it is denoised, for streamed answers (``partial_images``).

A preview shows the current estimate of the *clean* image, not the noisy latents: for the flow-matching
Euler schedulers both families use, a step moves the latents along the model's velocity,
``x_next = x + (sigma_next - sigma) * v``, so two consecutive latents give ``v`` and with it the clean
estimate ``x_next - sigma_next * v`` without another transformer call.

That estimate is turned into colours by a linear map from each latent vector to the mean RGB of the 8x8
pixels it stands for, instead of a VAE decode (seconds for the 20B edit model at 1024x1024 offloaded).
The map is fitted once per loaded pipeline, by least squares, against what its own VAE encodes from
smooth synthetic colour fields: nothing is copied from elsewhere, and a random-weight test checkpoint
gets a map of its own. The preview has the latent grid's resolution (1/8 of each side); the replica
scales it to the requested size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

FIT_IMAGES = 8
FIT_SIDE = 128  # 16x16 latents per image at the VAE factor 8: 2,048 samples for 17 unknowns per colour


def synthetic_images(count: int = FIT_IMAGES, side: int = FIT_SIDE, seed: int = 0) -> torch.Tensor:
    """(count, 3, side, side) smooth random colour fields in [-1, 1], the VAE's input range."""
    generator = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    fields = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    return fields * 2 - 1


def fit_latent_rgb(engine: Any) -> torch.Tensor:
    """A (channels + 1, 3) float32 matrix M with ``[latent, 1] @ M`` ~ the mean RGB (in [0, 1]) of the pixels
    a latent vector covers, for ``engine``'s VAE and latent normalization (``engine.encode_for_preview``)."""
    pipe = engine.pipe
    device = getattr(pipe, "_execution_device", None) or pipe.vae.device
    pixels = synthetic_images()
    with torch.inference_mode():
        latents = engine.encode_for_preview(pixels.to(device=device, dtype=pipe.vae.dtype)).float().cpu()
    factor = pixels.shape[-1] // latents.shape[-1]
    rgb = F.avg_pool2d((pixels + 1) / 2, kernel_size=factor)
    channels = latents.shape[1]
    inputs = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, channels),
                        torch.ones(latents.shape[0] * latents.shape[2] * latents.shape[3], 1)], dim=1)
    targets = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(inputs, targets).solution


class LatentPreviewer:
    """The step hook of one streamed pipeline call: after each wanted step, previews of every image."""

    def __init__(self, engine: Any, steps: Sequence[int],
                 on_preview: Callable[[int, int, list[np.ndarray]], None], width: int, height: int) -> None:
        self.engine = engine
        self.steps = frozenset(steps)
        self.on_preview = on_preview  # (step, index of the first image shown, previews)
        self.width, self.height = width, height
        self.previous = None  # the latents before a wanted step, kept only then
        self.last_step = -1
        self.first_image = 0  # families that make n images in n calls (the edit pipeline) reuse the hook
        self.batch = 0

    def __call__(self, step: int, latents: torch.Tensor) -> None:
        if step <= self.last_step:  # the next pipeline call of the same job
            self.first_image += self.batch
            self.previous = None
        self.last_step, self.batch = step, latents.shape[0]
        if step in self.steps:
            self.on_preview(step, self.first_image, self.previews(self.clean_estimate(step, latents)))
        self.previous = latents.clone() if step + 1 in self.steps else None

    def clean_estimate(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The clean image the model is heading for after ``step`` (the latents themselves after the first
        step, whose starting noise the hook never saw)."""
        sigmas = getattr(self.engine.pipe.scheduler, "sigmas", None)
        if self.previous is None or sigmas is None or step + 1 >= len(sigmas):
            return latents
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        if sigma == sigma_next:
            return latents
        velocity = (latents.float() - self.previous.float()) / (sigma_next - sigma)
        return latents.float() - sigma_next * velocity

    def previews(self, latents: torch.Tensor) -> list[np.ndarray]:
        grid = self.engine.latent_grid(latents, self.width, self.height).float()
        matrix = self.engine.latent_rgb().to(grid.device)
        rgb = torch.einsum("bchw,cd->bhwd", grid, matrix[:-1]) + matrix[-1]
        return list(rgb.clamp(0, 1).cpu().numpy())
