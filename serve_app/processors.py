"""An image-only Qwen2-VL processor for machines without torchvision.

transformers 5 builds ``Qwen2VLProcessor`` with a video processor, and that video processor
imports torchvision. PyPI has no CPU torchvision matching ``torch==2.13.0``, so on CPU
machines (CI, laptops) we assemble the same processor from its image processor (the PIL
backend) and tokenizer only. Image editing never sends video, so nothing is lost.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (and so without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "ImageOnlyQwen2VLProcessor":
        """Assemble the processor from a local pipeline folder's ``processor/`` (or ``tokenizer/``) files."""
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        root = Path(checkpoint)
        processor_dir = root / "processor"
        tokenizer_dir = processor_dir if (processor_dir / "tokenizer_config.json").exists() else root / "tokenizer"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
        tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None
