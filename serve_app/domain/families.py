"""Pipeline families: what each diffusers pipeline the catalog names is, in one record.

A catalog variant names its pipeline class (``pipeline: ZImagePipeline``); everything the planner, the config
rules, the router and the replicas need to know about that pipeline, beyond the variant's own figures, is its
family's record here. The engine that loads and runs it lives in ``serve_app/engines/<module>.py`` and is named
by ``engine`` (this layer imports no engine). Adding a family is one record here, one engine module, and the
catalog's data (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["generate", "edit"]
CfgKnob = Literal["guidance_scale", "true_cfg_scale"]


@dataclass(frozen=True)
class PipelineFamily:
    """One diffusers pipeline class, as imageserve serves it.

    Attributes:
        pipeline: the diffusers pipeline class name.
        tasks: the routes it serves: ``generate`` (a prompt), ``edit`` (a prompt and input images), or both from
            one checkpoint and one deployment.
        deployment_prefix: the first word of its deployments' names (``gen-z-image-turbo``).
        cfg_knob: what turns classifier-free guidance on: ``guidance_scale > 0``, or ``true_cfg_scale > 1`` with a
            negative prompt (each pipeline's own rule, diffusers 0.42.1).
        cfg_in_batch: CFG stacks the unconditional pass into the transformer's batch (one call of twice the batch)
            rather than running a second forward after the first: the planner sizes activations by it.
        padded_text_tokens: the text encoder's sequence when the pipeline pads every prompt to a fixed length; None
            when it runs the prompt (and any input images' vision tokens) as they come.
        vision_tokens_per_input: tokens each input image adds to the text encoder's sequence (its vision tower).
        input_image_side: the side of the square area each input image is resized to for the VAE.
        batches_requests: several requests of one shape share a pipeline call (a list of prompts), and ``n``
            images are one call; otherwise each request runs alone and its ``n`` images are one call each.
        step_cache: takes diffusers' step-cache hooks (first-block cache, TaylorSeer).
        masks_attention: the pipeline passes an attention mask (padding, CFG), which mask-less kernels drop.
        size_multiple: output sides must be multiples of it (VAE factor x patch).
        engine: ``module:Class`` of its engine under ``serve_app.engines``.
        nunchaku: whether a nunchaku 4-bit transformer exists for it.
        context_parallel: its transformer splits the sequence across ranks (Ulysses): with diffusers' own
            ``_cp_plan``, or the one its engine carries (``CONTEXT_PARALLEL_PLAN``).
        tensor_parallel: its transformer has diffusers' ``_tp_plan`` and the catalog counts what it shards.
    """

    pipeline: str
    tasks: tuple[Task, ...]
    deployment_prefix: str
    cfg_knob: CfgKnob
    cfg_in_batch: bool
    padded_text_tokens: int | None
    vision_tokens_per_input: int
    input_image_side: int
    batches_requests: bool
    step_cache: bool
    masks_attention: bool
    size_multiple: int
    engine: str
    nunchaku: bool = False
    context_parallel: bool = False
    tensor_parallel: bool = False

    def serves(self, task: str) -> bool:
        return task in self.tasks


# Merged vision tokens of one ~384^2 condition image in Qwen2.5-VL (14 px patches, 2x2 merge: sides round to 28),
# what QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE gives the text encoder.
QWEN_EDIT_VISION_TOKENS = (round(384 / 28)) ** 2
# Qwen-Image-2.1 resizes each condition image to output_resolution^2 (1024^2 by default) for both the vision
# encoder and the VAE; one vision slot stands for a 32x32 pixel tile (16 px patches, 2x2 merge).
QWEN_21_VISION_TOKENS = (1024 // 32) ** 2

FAMILIES: dict[str, PipelineFamily] = {f.pipeline: f for f in (
    PipelineFamily(
        pipeline="ZImagePipeline", tasks=("generate",), deployment_prefix="gen", cfg_knob="guidance_scale",
        cfg_in_batch=True, padded_text_tokens=512, vision_tokens_per_input=0, input_image_side=0,
        batches_requests=True, step_cache=False, masks_attention=True, size_multiple=16, engine="z_image:ZImageEngine",
        nunchaku=True, context_parallel=True),
    PipelineFamily(
        pipeline="QwenImageEditPlusPipeline", tasks=("edit",), deployment_prefix="edit", cfg_knob="true_cfg_scale",
        cfg_in_batch=False, padded_text_tokens=None, vision_tokens_per_input=QWEN_EDIT_VISION_TOKENS,
        input_image_side=1024, batches_requests=False, step_cache=True, masks_attention=False, size_multiple=16,
        engine="qwen_image_edit:QwenImageEditEngine", nunchaku=True, context_parallel=True, tensor_parallel=True),
    PipelineFamily(
        pipeline="QwenImage21Pipeline", tasks=("generate", "edit"), deployment_prefix="image",
        cfg_knob="true_cfg_scale", cfg_in_batch=False, padded_text_tokens=None,
        vision_tokens_per_input=QWEN_21_VISION_TOKENS, input_image_side=1024, batches_requests=False,
        step_cache=False, masks_attention=True, size_multiple=32, engine="qwen_image_21:QwenImage21Engine"),
)}


def family_of(pipeline: str) -> PipelineFamily:
    try:
        return FAMILIES[pipeline]
    except KeyError:
        raise ValueError(f"no pipeline family {pipeline!r}; known: {', '.join(FAMILIES)}") from None
