"""What each pipeline stage processes for a request: tokens and pixels, as diffusers 0.42's pipelines
build them. The planner sizes its estimates with these and the tracer traces the same shapes."""

from __future__ import annotations

from typing import Literal

from serve_app.domain.families import FAMILIES, PipelineFamily

Stage = Literal["text_encoder", "transformer", "vae_decode", "vae_encode"]

# Latent pixels per transformer token: 8x VAE downsampling, then 2x2 patches.
PIXELS_PER_TOKEN = 16 * 16
MPIX = 1024 * 1024
# A prompt's tokens after the chat template (an assumed typical prompt; the transformer sees these).
PROMPT_TOKENS = 256
# ZImagePipeline pads every prompt to max_sequence_length before the text encoder.
Z_IMAGE_TEXT_TOKENS = FAMILIES["ZImagePipeline"].padded_text_tokens
# QwenImageEditPlusPipeline resizes each input image to ~1024^2 area for the VAE and ~384^2 for the vision
# encoder, whatever the output size (the pipeline module's VAE_IMAGE_SIZE / CONDITION_IMAGE_SIZE).
EDIT_VAE_SIDE = 1024
EDIT_CONDITION_SIDE = 384


def image_tokens(width: int, height: int) -> int:
    return (height // 16) * (width // 16)


def transformer_tokens(width: int, height: int, num_input_images: int = 0) -> int:
    """Sequence length of one transformer forward: output latents, each input image's latents, the prompt."""
    return image_tokens(width, height) + num_input_images * image_tokens(EDIT_VAE_SIDE, EDIT_VAE_SIDE) + PROMPT_TOKENS


def text_encoder_tokens(family: PipelineFamily, num_input_images: int = 0) -> int:
    """Tokens the text encoder runs over: the padded prompt of a family that pads, else the prompt with each
    input image's vision tokens."""
    if family.padded_text_tokens is not None:
        return family.padded_text_tokens
    return PROMPT_TOKENS + num_input_images * family.vision_tokens_per_input
