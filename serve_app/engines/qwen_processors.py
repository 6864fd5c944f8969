"""The Qwen vision-language processors without their video processors, and so without torchvision.

transformers 5 builds ``Qwen2VLProcessor`` and ``Qwen3VLProcessor`` with a video processor that imports
torchvision, and PyPI has no CPU torchvision matching ``torch==2.13.0``; on such machines (CI, laptops) the same
processors are assembled from their PIL image processor and tokenizer. Nothing here sends video. Qwen-Image-Edit
(``qwen_image_edit``) takes the Qwen2 one, Qwen-Image-2.1 (``qwen_image_21``) the Qwen3 one, and the tiny
checkpoints (``random_weights``) save both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import Qwen2VLProcessor, Qwen3VLProcessor


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (Qwen-Image-Edit's)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> ImageOnlyQwen2VLProcessor:
        """Assemble the processor from a local pipeline folder's ``processor/`` (or ``tokenizer/``) files."""
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        root = Path(checkpoint)
        processor_dir = root / "processor"
        tokenizer_dir = processor_dir if (processor_dir / "tokenizer_config.json").exists() else root / "tokenizer"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
        tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor (Qwen-Image-2.1's). transformers' ``ProcessorMixin``
    derives the sub-processors from ``__init__``'s parameters: leaving ``video_processor`` out makes it an image
    processor and a tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> ImageOnlyQwen3VLProcessor:
        """Assemble the processor from a local pipeline folder's ``processor/`` files."""
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(checkpoint) / "processor"
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
        return cls(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer=tokenizer,
                   chat_template=tokenizer.chat_template)
