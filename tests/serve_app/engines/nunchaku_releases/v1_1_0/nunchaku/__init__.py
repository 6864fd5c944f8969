"""TEST DOUBLE of nunchaku 1.1.0 (nunchaku-tech/nunchaku v1.1.0); see ../../README.md."""

from .models import NunchakuQwenImageTransformer2DModel, NunchakuZImageTransformer2DModel

__all__ = ["NunchakuQwenImageTransformer2DModel", "NunchakuZImageTransformer2DModel"]
