"""The text-to-image deployment (Z-Image-Turbo variants)."""

from __future__ import annotations

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
        steps = request.num_inference_steps or self.variant.defaults.num_inference_steps

        def work(should_stop):
            result = self.pipeline.generate(
                request.prompt,
                n=request.n,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=request.guidance_scale,
                negative_prompt=request.negative_prompt,
                seed=request.seed,
                should_stop=should_stop,
            )
            return self._result(result, width, height, steps)

        return await self._run(work, (width, height, 0))
