"""TEST DOUBLE of the successor nunchaku (nunchux-ai/nunchaku main); see ../../README.md."""

from .models import NunchakuQwenImageTransformer2DModel, NunchakuZImageTransformer2DModel

__all__ = ["NunchakuQwenImageTransformer2DModel", "NunchakuZImageTransformer2DModel"]
