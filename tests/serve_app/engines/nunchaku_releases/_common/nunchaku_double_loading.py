"""What both nunchaku TEST DOUBLES share, because both releases share it: loading, and which
transformer can offload per block (only Qwen-Image's; see ../README.md for the sources).

The real ``from_pretrained`` reads a 4-bit safetensors file; the doubles read the full-precision
model saved beside it. Each release's own ``forward`` stays in its package, since that is where
the releases differ.
"""

from pathlib import Path


class LoadsBesideTheFile:
    """Mixin before a diffusers transformer class: nunchaku's ``from_pretrained(<file>, torch_dtype=)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(Path(pretrained_model_name_or_path).parent,
                                       torch_dtype=kwargs.get("torch_dtype"))


class ZImageLoading(LoadsBesideTheFile):
    """The Z-Image transformer of both releases: no ``set_offload`` at all, and ``from_pretrained`` refuses
    ``offload=True``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if kwargs.get("offload", False):
            raise NotImplementedError("Offload is not supported for ZImageTransformer2DModel")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


class QwenImageLoading(LoadsBesideTheFile):
    """The Qwen-Image transformer of both releases: per-block offload through ``set_offload(offload,
    **kwargs)``, which ``from_pretrained`` calls with its own ``offload`` (default False).

    The real one then streams its blocks from the host with a CPUOffloadManager; the double records
    the switch and the settings the manager would get (``use_pin_memory`` default True,
    ``num_blocks_on_gpu`` default 1)."""

    offload = False
    offload_settings = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        transformer = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        transformer.set_offload(kwargs.get("offload", False))
        return transformer

    def set_offload(self, offload, **kwargs):
        if offload == self.offload:  # as the real one: an unchanged switch changes nothing
            return
        self.offload = offload
        self.offload_settings = ({"use_pin_memory": kwargs.get("use_pin_memory", True),
                                  "num_blocks_on_gpu": kwargs.get("num_blocks_on_gpu", 1)}
                                 if offload else None)
