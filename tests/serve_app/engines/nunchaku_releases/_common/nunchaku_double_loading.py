"""What both nunchaku TEST DOUBLES share: the releases' loading and offload switch (same in both).

The real ``from_pretrained`` reads a 4-bit safetensors file; the doubles read the full-precision
model saved beside it. Each release's own ``forward`` stays in its package, since that is where
the releases differ.
"""

from pathlib import Path


class LoadsBesideTheFile:
    """Mixin before a diffusers transformer class: nunchaku's ``from_pretrained(<file>, torch_dtype=)``
    and ``set_offload``."""

    offload = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(Path(pretrained_model_name_or_path).parent,
                                       torch_dtype=kwargs.get("torch_dtype"))

    def set_offload(self, offload, **kwargs):
        self.offload = offload
