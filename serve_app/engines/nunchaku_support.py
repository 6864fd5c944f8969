"""The real nunchaku (SVDQuant 4-bit transformers): finding it, refusing the impostor, and fitting
each known release to the diffusers this project runs on.

The PyPI distribution named ``nunchaku`` is an unrelated Bayesian segmentation library. The real
one (nunchaku-tech/nunchaku, and its successor nunchux-ai/nunchaku) is a CUDA extension installed
from its GitHub release or Hugging Face wheels, one per Python x torch x CUDA. We recognise it by
what it exports, not by its name, and read its version from the installed package's metadata.

Each nunchaku release was written against some diffusers; where its transformer calls diffusers
differently from how diffusers 0.42 calls it (or is called by it), an adapter below bridges the
difference on the loaded transformer. Each adapter looks for the exact thing it fixes in the
release's code, so it applies to every release that has it and to none that does not. After the
adapters, ``fit_to_diffusers`` checks that the transformer takes every argument the pipeline passes,
and refuses the pair by name otherwise. docs/compatibility.md has the matrix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

INSTALL_HINT = (
    "install the real nunchaku wheel for your Python/torch/CUDA from "
    "https://github.com/nunchaku-tech/nunchaku/releases (or its Hugging Face mirror), e.g. "
    "nunchaku-1.1.0+torch2.9-cp312-cp312-linux_x86_64.whl; `pip install nunchaku` installs an unrelated package"
)


class NunchakuUnavailableError(ImportError):
    """The real nunchaku cannot be imported here (missing, impostor, or broken build)."""


class NunchakuIncompatibleError(RuntimeError):
    """This nunchaku and this diffusers cannot run a pipeline together, and no adapter bridges them."""


def installed_version() -> str | None:
    """The installed ``nunchaku`` distribution's version, from its metadata (no import needed)."""
    try:
        return importlib.metadata.version("nunchaku")
    except importlib.metadata.PackageNotFoundError:
        return None


def _named() -> str:
    version = installed_version()
    return f"nunchaku {version}" if version else "nunchaku"


def nunchaku_status() -> tuple[bool, str]:
    """(usable, one-line explanation) for ``imageserve doctor`` and error messages."""
    spec = importlib.util.find_spec("nunchaku")
    if spec is None:
        return False, f"not installed; {INSTALL_HINT}"
    named = _named()
    try:
        module = importlib.import_module("nunchaku")
    except Exception as err:  # noqa: BLE001 - a broken build fails with ImportError, OSError, RuntimeError...
        return False, (
            f"{named} is installed ({spec.origin}) but fails to import: {type(err).__name__}: {err}; it is "
            f"probably built for another Python, torch or CUDA than this one: {INSTALL_HINT}"
        )
    try:
        importlib.import_module("nunchaku.models")
    except ImportError as err:
        origin = getattr(module, "__file__", "?")
        return False, (
            f"the importable 'nunchaku' ({origin}) has no nunchaku.models: it is the unrelated PyPI "
            f"package or a broken build ({err}); {INSTALL_HINT}"
        )
    if not hasattr(module, "NunchakuQwenImageTransformer2DModel"):
        return False, f"{named} lacks NunchakuQwenImageTransformer2DModel; {INSTALL_HINT}"
    return True, f"{named} (real, with 4-bit transformers)"


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
        raise NunchakuUnavailableError(f"{_named()} has no {name}; upgrade it: {INSTALL_HINT}") from None


# ---- adapters ---------------------------------------------------------------------------------


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source shipped: nothing to match, no adapter
        return ""


def accepted_keywords(function: Callable) -> set[str] | None:
    """Keyword arguments ``function`` takes (None when it takes any: ``**kwargs``)."""
    params = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)}


def _rope_takes_max_text_length() -> bool:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    return "max_txt_seq_len" in inspect.signature(QwenEmbedRope.forward).parameters


@dataclass(frozen=True)
class Adapter:
    """A bridge between one nunchaku call pattern and diffusers 0.42."""

    name: str
    releases: str
    needed: Callable[[type], bool]  # given the transformer's class
    apply: Callable[[object], None]  # given the loaded transformer
    replaces_forward: bool = False  # the adapted forward takes whatever diffusers passes


def _qwen_rope_call_needed(transformer_class: type) -> bool:
    return ("self.pos_embed(img_shapes, txt_seq_lens" in _source(transformer_class.forward)
            and _rope_takes_max_text_length())


def _qwen_rope_call_apply(transformer) -> None:
    import torch

    class TextLengthRope(torch.nn.Module):
        """diffusers 0.42's QwenEmbedRope behind the call nunchaku makes: ``(img_shapes, txt_seq_lens,
        device=...)``. The 0.42 pipeline passes no ``txt_seq_lens``; the text length is the length of the
        ``encoder_hidden_states`` this forward was given, which the pre-hook below records."""

        def __init__(self, rope) -> None:
            super().__init__()
            self.rope = rope
            self.text_length: int | None = None

        def forward(self, video_fhw, txt_seq_lens=None, device=None, max_txt_seq_len=None):
            if max_txt_seq_len is None:
                max_txt_seq_len = max(txt_seq_lens) if txt_seq_lens else self.text_length
            return self.rope(video_fhw, device=device, max_txt_seq_len=max_txt_seq_len)

    rope = TextLengthRope(transformer.pos_embed)

    def record_text_length(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        rope.text_length = None if text is None else text.shape[1]

    transformer.pos_embed = rope
    transformer.register_forward_pre_hook(record_text_length, with_kwargs=True)


def _z_image_forward_needed(transformer_class: type) -> bool:
    keywords = accepted_keywords(transformer_class.forward)
    return (hasattr(transformer_class, "register_rope_hook") and keywords is not None
            and "joint_attention_kwargs" not in keywords)


def _z_image_forward_apply(transformer) -> None:
    from diffusers import ZImageTransformer2DModel

    rope_hook_class = sys.modules[type(transformer).__module__].NunchakuZImageRopeHook

    def forward(x, t, cap_feats, *args, **kwargs):
        # nunchaku's own forward registers its rope hooks and then calls diffusers' forward with the
        # arguments in the order of an older diffusers; this does the same with keywords.
        transformer.register_rope_hook(rope_hook_class())
        try:
            return ZImageTransformer2DModel.forward(transformer, x, t, cap_feats, *args, **kwargs)
        finally:
            transformer.unregister_rope_hook()

    transformer.forward = forward


ADAPTERS = (
    Adapter(
        name="qwen-rope-call",
        releases="nunchaku-tech 1.0.x-1.1.x with diffusers >= 0.42 (diffusers #13674 changed QwenEmbedRope.forward)",
        needed=_qwen_rope_call_needed,
        apply=_qwen_rope_call_apply,
    ),
    Adapter(
        name="z-image-forward-call",
        releases="nunchux-ai/nunchaku (the successor): a forward without joint_attention_kwargs that calls "
                 "diffusers' forward positionally",
        needed=_z_image_forward_needed,
        apply=_z_image_forward_apply,
        replaces_forward=True,
    ),
)


def fit_to_diffusers(transformer, pipeline: str, call_keywords: frozenset[str]) -> list[str]:
    """Apply the adapters this transformer needs; refuse it when the pipeline's call still would not fit.

    Args:
        pipeline: the diffusers pipeline class that will call it (for the message).
        call_keywords: the keyword arguments that pipeline passes to its transformer.

    Returns:
        The names of the adapters applied.
    """
    import diffusers

    applied = []
    for adapter in ADAPTERS:
        if adapter.needed(type(transformer)):
            adapter.apply(transformer)
            applied.append(adapter.name)
    keywords = accepted_keywords(transformer.forward)
    missing = set() if keywords is None else set(call_keywords) - keywords
    if missing:
        raise NunchakuIncompatibleError(
            f"{_named()} and diffusers {diffusers.__version__} do not fit: {type(transformer).__name__}.forward "
            f"takes no {', '.join(sorted(missing))}, which {pipeline} passes, and no adapter knows this "
            "release; see docs/compatibility.md for the pairs that work")
    return applied


def compatibility(families: dict[str, tuple[str, frozenset[str]]]) -> dict:
    """How the installed nunchaku fits this diffusers, per pipeline, without loading any weights.

    Args:
        families: pipeline class -> (nunchaku transformer class name, keywords the pipeline passes).

    Returns:
        {"nunchaku", "diffusers", "torch", "pipelines": {pipeline: {"works", "adapters", "reason"}}}.
    """
    import diffusers
    import torch

    usable, why = nunchaku_status()
    report: dict = {"nunchaku": installed_version(), "diffusers": diffusers.__version__,
                    "torch": torch.__version__, "pipelines": {}}
    for pipeline, (class_name, call_keywords) in families.items():
        if not usable:
            report["pipelines"][pipeline] = {"works": False, "adapters": [], "reason": why}
            continue
        cls = getattr(importlib.import_module("nunchaku"), class_name, None)
        if cls is None:
            reason = f"{_named()} has no {class_name}"
            report["pipelines"][pipeline] = {"works": False, "adapters": [], "reason": reason}
            continue
        needed = [a for a in ADAPTERS if a.needed(cls)]
        adapters = [a.name for a in needed]
        keywords = None if any(a.replaces_forward for a in needed) else accepted_keywords(cls.forward)
        missing = set() if keywords is None else set(call_keywords) - keywords
        report["pipelines"][pipeline] = {
            "works": not missing, "adapters": adapters,
            "reason": None if not missing else f"{class_name}.forward takes no {', '.join(sorted(missing))}"}
    return report
