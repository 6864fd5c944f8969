"""The text-to-image deployment (Z-Image-Turbo variants)."""

from __future__ import annotations

import functools

from ray import serve

from deployments.model_server import ModelServer
from serve_app.schemas import GenerateRequest, ImageResult


@serve.deployment(name="generation")
class GenerationServer(ModelServer):
    task = "generate"

    def _warmup(self) -> None:
        width, height = self._warmup_size()
        self.pipeline.generate("warm-up", width=width, height=height, num_inference_steps=1, seed=0)

    async def generate(self, request: GenerateRequest, width: int, height: int) -> ImageResult:
        """Run one generation request whose size the router has already resolved and checked."""
        return await self._serve(request, width, height, 0, functools.partial(
            self.pipeline.generate, guidance_scale=request.guidance_scale))
