"""The instruction image-editing deployment (Qwen-Image-Edit variants)."""

from __future__ import annotations

from PIL import Image
from ray import serve

from deployments.model_server import ModelServer
from serve_app.images import decode_image
from serve_app.schemas import EditRequest, ImageResult


@serve.deployment(name="editing")
class EditServer(ModelServer):
    task = "edit"

    def _warmup(self) -> None:
        width, height = self._warmup_size()
        image = Image.new("RGB", (width, height), (127, 127, 127))
        self.pipeline.edit([image], "warm-up", width=width, height=height, num_inference_steps=1, seed=0)

    async def edit(self, request: EditRequest, width: int, height: int) -> ImageResult:
        """Run one edit request whose size and images the router has already checked."""

        def call(**common):
            limit = self.config.serving.limits.max_input_pixels
            images = [decode_image(data, limit, name=f"image {i + 1}") for i, data in enumerate(request.images)]
            return self.pipeline.edit(images, true_cfg_scale=request.true_cfg_scale, **common)

        return await self._serve(request, width, height, len(request.images), call)
