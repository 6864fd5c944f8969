"""Finding the real nunchaku (SVDQuant 4-bit kernels) and refusing the impostor.

The PyPI distribution named ``nunchaku`` is an unrelated Bayesian segmentation library. The real
one (nunchaku-tech/nunchaku) is a CUDA extension installed from its GitHub release or Hugging Face
wheels, one per Python x torch x CUDA. We detect it by what it exports, not by its name.
"""

from __future__ import annotations

import importlib

INSTALL_HINT = (
    "install the real nunchaku wheel for your Python/torch/CUDA from "
    "https://github.com/nunchaku-tech/nunchaku/releases (or its Hugging Face mirror), e.g. "
    "nunchaku-1.1.0+torch2.9-cp312-cp312-linux_x86_64.whl; `pip install nunchaku` installs an unrelated package"
)


class NunchakuUnavailableError(ImportError):
    """The real nunchaku cannot be imported here (missing, impostor, or broken build)."""


def nunchaku_status() -> tuple[bool, str]:
    """(usable, one-line explanation) for ``imageserve doctor`` and error messages."""
    try:
        module = importlib.import_module("nunchaku")
    except ImportError as err:
        return False, f"not installed ({err}); {INSTALL_HINT}"
    try:
        importlib.import_module("nunchaku.models")
    except ImportError as err:
        origin = getattr(module, "__file__", "?")
        return False, (
            f"the importable 'nunchaku' ({origin}) has no nunchaku.models: it is the unrelated PyPI "
            f"package or a broken build ({err}); {INSTALL_HINT}"
        )
    if not hasattr(module, "NunchakuQwenImageTransformer2DModel"):
        version = getattr(module, "__version__", "?")
        return False, f"nunchaku {version} lacks NunchakuQwenImageTransformer2DModel; {INSTALL_HINT}"
    return True, f"nunchaku {getattr(module, '__version__', '?')} (real, with 4-bit transformers)"


def transformer_class(name: str):
    """The real nunchaku's transformer class ``name`` (e.g. ``NunchakuZImageTransformer2DModel``),
    or an error that says what is wrong with the nunchaku this machine has."""
    usable, why = nunchaku_status()
    if not usable:
        raise NunchakuUnavailableError(f"4-bit variants need the real nunchaku: {why}")
    module = importlib.import_module("nunchaku")
    try:
        return getattr(module, name)
    except AttributeError:
        raise NunchakuUnavailableError(f"nunchaku has no {name}; upgrade it: {INSTALL_HINT}") from None
