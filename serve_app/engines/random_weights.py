"""Tiny random-weight checkpoints of the real pipelines, built offline.

No weights can be downloaded on CI or a developer laptop, so the tests and the embedded
default service load these instead. They are the *same classes* as the real checkpoints
(``ZImagePipeline`` and ``QwenImageEditPlusPipeline`` with their transformers, text
encoders, VAEs, tokenizer and processor), saved with ``save_pretrained`` in the Hugging
Face layout, so they go through exactly the ``from_pretrained`` code that loads real
weights. Only the sizes differ.

The same builders at size "full" make random-weight pipelines with the real architecture
numbers of docs/facts.md (same parameter counts, FLOPs and memory as the real weights), built in
memory on a GPU by ``RandomWeightLoader`` for bench/gpu_fullsize.py.

The tokenizer is a byte-level BPE with no merges plus the Qwen special tokens and a chat
template, so it needs no hub download. The edit processor is built image-only (no video
processor) because transformers 5's video processor needs torchvision, which has no CPU
build matching ``torch==2.13.0`` on PyPI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Bumped whenever the tiny checkpoints change, so a cached folder of an older build is rebuilt.
# 2: Z-Image's rotary tables as long as the real model's (sizes above 1024 px failed with an IndexError).
TINY_FORMAT = 2


def tiny_checkpoint(root: str | os.PathLike, base_model: str) -> Path:
    """Where ``build_all(root)`` puts the tiny checkpoint of ``base_model``: every variant of a base model (bf16,
    fp8 or 4-bit) runs on its base model's checkpoint on CPU."""
    return Path(root) / f"{base_model}-tiny"

_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# Qwen3's template, reduced to what the pipelines use: roles, generation prompt, and the
# empty think block that ``enable_thinking=False`` adds.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# The tiny text encoders' width; the tiny transformers' caption/joint attention width must match.
_TINY_TEXT_HIDDEN = 32


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2 mapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def build_tokenizer():
    """A Qwen2 byte-level tokenizer (no merges) with the Qwen special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_level_alphabet())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([_QWEN_SPECIAL_TOKENS[0]], special_tokens=True)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def padded_vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 63) // 64 * 64


# Architecture numbers per size. "full" is docs/facts.md's (the real checkpoints' configs); "tiny" keeps
# every code path (RoPE, refiners, CFG, vision tower, VAE up/down blocks) at a size that runs a
# 64x64 call in well under a second on two CPU cores.
Z_IMAGE_DIMS = {
    "tiny": {
        # The real model's rotary table lengths: they bound the image side (512 patches of 16 px), and the
        # tiny checkpoint must take every size production takes.
        "transformer": dict(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                            cap_feat_dim=_TINY_TEXT_HIDDEN, axes_dims=[8, 4, 4], axes_lens=[1536, 512, 512]),
        "text_encoder": dict(hidden_size=_TINY_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048),
        "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64),
    },
    "full": {
        "transformer": dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        "text_encoder": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                             rope_theta=1000000.0),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024),
    },
}


def z_image_pipeline(size: str = "tiny", seed: int = 0):
    """A random-weight ``ZImagePipeline`` (transformer, Qwen3 encoder, Flux-style VAE) of ``size``
    ("tiny" or "full"), built on the current default device and dtype."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    dims = Z_IMAGE_DIMS[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, norm_eps=1e-5, qk_norm=True,
        rope_theta=256.0, t_scale=1000.0, **dims["transformer"],
    )
    # These pad tokens are created with torch.empty; real checkpoints overwrite them.
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, **dims["vae"],
    )
    text_config = {"vocab_size": padded_vocab_size(tokenizer), **dims["text_encoder"]}
    text_encoder = Qwen3Model(Qwen3Config(pad_token_id=tokenizer.pad_token_id, **text_config))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_z_image(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny ``ZImagePipeline`` to ``out_dir``."""
    out = Path(out_dir)
    z_image_pipeline("tiny", seed).save_pretrained(out, safe_serialization=True)
    return out


def build_processor(tokenizer):
    """An image-only ``Qwen2VLProcessor`` (PIL image processor + tokenizer, no video processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from serve_app.engines.qwen_processors import ImageOnlyQwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE)


QWEN_IMAGE_EDIT_DIMS = {
    "tiny": {
        "transformer": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=_TINY_TEXT_HIDDEN, axes_dims_rope=(4, 6, 6)),
        "vae": dict(base_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        "text": dict(hidden_size=_TINY_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, max_position_embeddings=4096,
                     rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}),
        "vision": dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=_TINY_TEXT_HIDDEN,
                       fullatt_block_indexes=[1]),
        "vocab_size": None,  # the tokenizer's, padded
    },
    "full": {
        "transformer": dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                            axes_dims_rope=(16, 56, 56)),
        "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=128000,
                     rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
        "vocab_size": 152064,
    },
}


# The scheduler/scheduler_config.json of Qwen/Qwen-Image-Edit-2509 and -2511 (docs/facts.md), so the
# tiny checkpoints schedule exactly as the real ones do (shift_terminal included).
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "invert_sigmas": False, "stochastic_sampling": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def qwen_image_edit_pipeline(size: str = "tiny", zero_cond_t: bool = False, seed: int = 0):
    """A random-weight ``QwenImageEditPlusPipeline`` of ``size``; ``zero_cond_t=True`` makes it 2511."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    dims = QWEN_IMAGE_EDIT_DIMS[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _QWEN_SPECIAL_TOKENS}
    transformer_kwargs = dict(patch_size=2, in_channels=64, out_channels=16, guidance_embeds=False,
                              **dims["transformer"])
    if zero_cond_t:
        transformer_kwargs["zero_cond_t"] = True
    transformer = QwenImageTransformer2DModel(**transformer_kwargs)
    z_dim = 16
    vae = AutoencoderKLQwenImage(
        z_dim=z_dim, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **dims["vae"],
    )
    vocab_size = dims["vocab_size"] or padded_vocab_size(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            **dims["text"],
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, **dims["vision"]},
        vocab_size=vocab_size,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return QwenImageEditPlusPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=build_processor(tokenizer),
        transformer=transformer,
    )


def build_qwen_image_edit(out_dir: str | os.PathLike, zero_cond_t: bool = False, seed: int = 0) -> Path:
    """Save a tiny ``QwenImageEditPlusPipeline``; ``zero_cond_t=True`` makes it the 2511 flavour."""
    pipe = qwen_image_edit_pipeline("tiny", zero_cond_t, seed)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    # Record the processor as the real checkpoints do, so this folder is laid out exactly
    # like Qwen/Qwen-Image-Edit-2509; the loader picks the image-only class when needed.
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    processor_config = out / "processor" / "processor_config.json"
    data = json.loads(processor_config.read_text())
    data["processor_class"] = "Qwen2VLProcessor"
    processor_config.write_text(json.dumps(data, indent=2) + "\n")
    return out


def random_weight_pipeline(variant_id: str, size: str, device: str, dtype: torch.dtype):
    """Build the pipeline of a bf16 catalog variant with random weights, directly on ``device``
    (no checkpoint on disk: a full-size Qwen-Image-Edit is 57 GB)."""
    from serve_app.domain.catalog import default_catalog

    variant = default_catalog().variant(variant_id)
    if variant.requires_nunchaku:
        raise ValueError(f"{variant_id}: random weights are built for bf16 variants; 4-bit needs nunchaku's kernels")
    if variant.pipeline not in ("ZImagePipeline", "QwenImageEditPlusPipeline"):
        # Full-size dimensions are known for these two (docs/facts.md); Qwen-Image-2.1's Hub config was not
        # readable where its family was added.
        raise ValueError(f"{variant_id}: no full-size random-weight build for {variant.pipeline}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise 20 B parameters in fp32 first
    try:
        with torch.device(device):
            if variant.pipeline == "ZImagePipeline":
                return z_image_pipeline(size)
            return qwen_image_edit_pipeline(size, zero_cond_t=variant.id.endswith("2511"))
    finally:
        torch.set_default_dtype(previous)


class RandomWeightLoader:
    """An ``EngineLoader`` that builds a variant's pipeline with random weights of ``size`` in the
    replica, then places it as the spec's offload mode says.

    Benchmarks use it to serve full-size models on a GPU with no weights downloaded; the pipeline
    classes, the engine and everything after loading are the real ones.
    """

    def __init__(self, size: str = "full") -> None:
        self.size = size

    def __call__(self, spec):
        import time

        from serve_app.engines import engine_class
        from serve_app.engines.loading import DTYPES, LoadTarget

        started = time.perf_counter()
        target = LoadTarget.for_spec(spec)
        build_on = target.device if target.offload_mode == "none" else "cpu"
        pipe = random_weight_pipeline(spec.variant.id, self.size, build_on, DTYPES[target.torch_dtype])
        return engine_class(spec.variant.pipeline).prepare(pipe, spec, target, started,
                                                           source=f"<random {self.size} weights>")


def tiny_lora(root: str | os.PathLike, base_model: str) -> Path:
    """Where ``build_all(root)`` puts a tiny LoRA for ``base_model``'s transformer (Qwen-Image-Edit only): what the
    Lightning variants fuse at load, in diffusers' LoRA format."""
    return Path(f"{tiny_checkpoint(root, base_model)}-lora.safetensors")


def tiny_style_lora(root: str | os.PathLike, base_model: str) -> Path:
    """Where ``build_all(root)`` puts a tiny per-request LoRA for ``base_model``'s transformer (what the embedded
    default lists under ``loras:``), in diffusers' LoRA format."""
    return Path(f"{tiny_checkpoint(root, base_model)}-style-lora.safetensors")


# The attention projections ``build_tiny_lora`` targets by default (peft matches them by name suffix).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def build_tiny_lora(checkpoint: Path, out_file: Path, seed: int = 0, rank: int = 4,
                    target_modules: list[str] | tuple[str, ...] | None = None, alpha: int | None = None) -> Path:
    """A LoRA of ``rank`` on every attention projection of the checkpoint's transformer (Z-Image or
    Qwen-Image-Edit), built with peft, with random (non-zero) up and down matrices so that it changes the
    output; ``seed`` makes different LoRAs of the same shape.

    ``target_modules`` (peft's module name patterns) replaces the attention projections. ``alpha`` sets
    ``lora_alpha`` (default: the rank, i.e. scaling 1) and is then written to the file as diffusers' adapter
    metadata (the ``lora_adapter_metadata`` header entry), which ``load_lora_weights`` reads back as the
    ``LoraConfig``; without it the file holds the weights only, as before."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    index = json.loads((checkpoint / "model_index.json").read_text())
    transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(checkpoint / "transformer")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=False,
        # peft adapts the names the transformer has: Qwen's joint blocks have the add_* text projections too.
        target_modules=list(ATTENTION_PROJECTIONS if target_modules is None else target_modules))
    transformer.add_adapter(config)
    metadata = {} if alpha is None else {"transformer_lora_adapter_metadata": config.to_dict()}
    getattr(diffusers, index["_class_name"]).save_lora_weights(
        out_file.parent, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=out_file.name,
        **metadata)
    return out_file


def build_all(root: str | os.PathLike, force: bool = False) -> dict[str, Path]:
    """Build every tiny checkpoint under ``root`` (skipping complete ones unless ``force``).

    Returns base model id -> checkpoint folder.
    """
    from serve_app.domain.catalog import default_catalog
    from serve_app.engines import engine_class

    # One checkpoint per base model, built by its family's engine (``build_tiny``); a base model with a Lightning
    # variant also gets the LoRA that variant fuses.
    variants: dict[str, list] = {}
    for variant in default_catalog().variants.values():
        variants.setdefault(variant.base_model, []).append(variant)
    built = {}
    for base_model, of_base in variants.items():
        target = tiny_checkpoint(root, base_model)
        marker = target / ".imageserve-tiny.json"
        current = json.loads(marker.read_text()).get("format") if marker.exists() else None
        if force or current != TINY_FORMAT:
            engine_class(of_base[0].pipeline).build_tiny(target, of_base[0])
            marker.write_text(json.dumps({"kind": base_model, "random_weights": True, "format": TINY_FORMAT}) + "\n")
        lora = tiny_lora(root, base_model)
        if any(v.source.lora_file for v in of_base) and (force or not lora.exists()):
            build_tiny_lora(target, lora)
        style = tiny_style_lora(root, base_model)
        if force or not style.exists():
            build_tiny_lora(target, style, seed=1)
        built[base_model] = target
    return built
