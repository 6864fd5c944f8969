"""Per-request LoRAs on a loaded pipeline, through diffusers' PEFT integration.

A replica keeps up to ``max_loaded_loras`` adapters in its transformer, each in a *slot* (a PEFT adapter
name), least recently used first. A request names one LoRA and a scale; ``LoraAdapters.use`` makes that
adapter the only active one at that scale, or turns every adapter off for a request without one. A LoRA
that is not loaded takes a free slot, or replaces the least recently used adapter in place: PEFT's hotswap
copies the new weights into the old adapter's tensors, so no module is created or dropped (and a later
compiled transformer would not recompile). ``enable_lora_hotswap`` pads the first adapter loaded to the
largest rank of the allow-list; an adapter loaded later keeps its LoRA's rank, and a hotswap of a larger rank
into it grows its tensors (``torch.utils.swap_tensors``, peft/utils/hotswap.py:571-579), which is fine for the
uncompiled transformers that take per-request LoRAs.

PEFT hotswaps only onto modules the slot's adapter already has (a LoRA on fewer modules is fine: the rest are
zeroed). A LoRA on other modules, or one PEFT refuses for another reason, is loaded afresh into the slot once
the evicted adapter's layers are gone from every module.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from safetensors import safe_open

from serve_app.domain.config import HFConfig
from serve_app.domain.errors import UnsupportedValueError
from serve_app.domain.schemas import LoraRequest
from serve_app.domain.specs import LoraSpec
from serve_app.engines.loading import weight_file
from serve_app.engines.protocol import ModelLoadError

logger = logging.getLogger(__name__)

LoraOutcome = Literal["hit", "load", "hotswap"]


def lora_file(spec: LoraSpec, hf: HFConfig) -> Path:
    """The local weight file of ``spec``: its file, the file in its folder, or its hub file from the cache."""
    local = Path(spec.source).expanduser()
    if local.is_dir() and spec.file is None:
        raise ModelLoadError(f"LoRA {spec.name}: {local} is a folder; name the weight file (loras.{spec.name}.file)")
    is_hub = not local.exists() and not spec.source.startswith(("/", ".", "~"))
    return weight_file(None if is_hub else spec.source, spec.source if is_hub else None, spec.file, spec.revision,
                       hf, f"LoRA {spec.name}")


def lora_rank(path: Path) -> int:
    """The largest rank of a LoRA file in diffusers' or PEFT's format (rows of its ``lora_A`` / ``lora_down``
    matrices), read from the safetensors header without loading the weights."""
    ranks = []
    try:
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                if ".lora_A." in key or ".lora_down." in key:
                    ranks.append(weights.get_slice(key).get_shape()[0])
    except Exception as err:  # noqa: BLE001 - safetensors raises its own kinds for a bad file
        raise ModelLoadError(f"LoRA file {path} is not readable safetensors: {err}") from None
    if not ranks:
        raise ModelLoadError(f"{path} holds no LoRA matrices (no lora_A/lora_down weights)")
    return max(ranks)


def lora_modules(path: Path) -> frozenset[str] | None:
    """The transformer modules a LoRA file adapts, from the tensor names in its safetensors header, when they are
    all in diffusers' PEFT layout (``transformer.<module>.lora_A.weight``); None for any other layout (kohya,
    ComfyUI, ...), which only diffusers' converters can map to module names."""
    modules = set()
    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except Exception:  # noqa: BLE001 - unreadable now: the load reports it
        return None
    for key in keys:
        module, lora, _ = key.partition(".lora_")
        if not lora or not module.startswith("transformer."):
            return None
        modules.add(module.removeprefix("transformer."))
    return frozenset(modules)


class LoraAdapters:
    """The per-request LoRAs of one pipeline: an LRU of loaded adapters, switched per pipeline call.

    Not thread-safe: the engine calls ``use`` under its pipeline lock, right before the call it is for.

    Args:
        pipe: a diffusers pipeline with a LoRA loader mixin (``load_lora_weights``, ``set_adapters``).
        files: LoRA name -> its local weight file (the allow-list of this variant).
        capacity: how many adapters stay loaded at once.
    """

    def __init__(self, pipe, files: dict[str, Path], capacity: int) -> None:
        self.pipe = pipe
        self.files = dict(files)
        self.capacity = capacity
        # Adapter names of one width (slot0..slot9, or slot00..slot63), so that none is a substring of another:
        # PEFT's hotswap finds the slot's current tensors by substring (``adapter_name in key``,
        # peft/utils/hotswap.py:472) and zeroes those the new LoRA lacks (:495-504), so a hotswap into "slot1"
        # would also zero "slot10".."slot19" (diffusers/loaders/peft.py:363 matches by substring too).
        width = len(str(capacity - 1))
        self._slot_names = [f"slot{i:0{width}d}" for i in range(capacity)]
        self._slots: OrderedDict[str, str] = OrderedDict()  # LoRA name -> adapter name, least recently used first
        self._enabled = True
        self.counts: dict[LoraOutcome, int] = {"hit": 0, "load": 0, "hotswap": 0}
        # Before the first adapter: slots are then padded to this rank and hold any LoRA of the list.
        pipe.enable_lora_hotswap(target_rank=max(lora_rank(path) for path in self.files.values()))

    @property
    def loaded(self) -> list[str]:
        """Loaded LoRAs, least recently used first."""
        return list(self._slots)

    def use(self, lora: LoraRequest | None) -> LoraOutcome | None:
        """Make ``lora`` the only active adapter, at its scale (None: no adapter at all); returns whether it
        was loaded already (``hit``), loaded into a free slot (``load``) or swapped into the least recently
        used one (``hotswap``), or None without a LoRA."""
        if lora is None:
            if self._slots and self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return None
        if lora.name not in self.files:
            raise UnsupportedValueError(f"LoRA {lora.name!r} is not one this variant takes; it takes "
                                        f"{', '.join(sorted(self.files)) or 'none'}", param="lora")
        outcome: LoraOutcome = "hit"
        if lora.name in self._slots:
            self._slots.move_to_end(lora.name)
        else:
            outcome = self._load(lora.name)
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True
        self.pipe.set_adapters([self._slots[lora.name]], [lora.scale])
        self.counts[outcome] += 1
        return outcome

    def _load(self, name: str) -> LoraOutcome:
        if len(self._slots) < self.capacity:
            used = set(self._slots.values())
            slot = next(slot for slot in self._slot_names if slot not in used)
            self._load_into(slot, name, hotswap=False)
            return "load"
        evicted, slot = self._slots.popitem(last=False)
        logger.info("LoRA %s replaces %s (least recently used) in adapter %s", name, evicted, slot)
        incoming = lora_modules(self.files[name])
        if incoming is not None and not incoming <= self._modules_of(slot):
            # PEFT would refuse it (unexpected keys): skip the attempt, and diffusers' ERROR logs about it.
            logger.info("LoRA %s adapts modules that %s does not: loading it afresh into %s", name, evicted, slot)
            self._delete(slot)
            self._load_into(slot, name, hotswap=False)
            return "hotswap"
        try:
            self._load_into(slot, name, hotswap=True)
        except ModelLoadError as err:
            # PEFT refused the hotswap (targets or config differ); _load_into deleted the slot: load afresh.
            logger.info("hotswapping LoRA %s into %s failed (%s): loading it afresh", name, slot, err)
            self._load_into(slot, name, hotswap=False)
        else:
            self._keep_hotswapped_scaling(slot)
        return "hotswap"

    def _load_into(self, slot: str, name: str, hotswap: bool) -> None:
        path = self.files[name]
        try:
            with warnings.catch_warnings():
                # peft warns whenever a model gains a second adapter: that is what the slots are for.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=slot,
                                            hotswap=hotswap)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            # The slot's old weights may be half replaced: drop the adapter rather than serve a mix.
            self._delete(slot)
            raise ModelLoadError(f"loading LoRA {name} from {path} failed: {type(err).__name__}: {err}") from err
        self._slots[name] = slot

    def _lora_layers(self, slot: str):
        """(module name, LoRA layer) of every layer of the transformer that holds ``slot`` (the transformer is
        where these pipelines load LoRAs, and the only model diffusers hotswaps)."""
        from peft.tuners.lora import LoraLayer

        for module_name, module in self.pipe.transformer.named_modules():
            if isinstance(module, LoraLayer) and slot in module.lora_A:
                yield module_name, module

    def _modules_of(self, slot: str) -> frozenset[str]:
        """The transformer modules that hold a layer of ``slot``, named as ``lora_modules`` names them."""
        return frozenset(name for name, _ in self._lora_layers(slot))

    def _delete(self, slot: str) -> None:
        """Remove ``slot`` from every PEFT layer and from ``peft_config``, whether diffusers still lists it or not.

        diffusers' ``load_lora_adapter`` (diffusers/loaders/peft.py:356-366), when a load or hotswap fails, deletes
        the adapter only from layers where it is *active*, then pops its ``peft_config`` entry: an inactive slot (the
        least recently used one, when more than one is loaded) keeps its layers but vanishes from
        ``get_list_adapters()``, which reads ``peft_config``. A fresh load under that name then injects the new
        LoRA's modules and leaves the old ones in the rest, and ``set_adapters([slot])`` turns both on.
        ``pipe.delete_adapters`` (diffusers/loaders/lora_base.py:890-896 -> ModelMixin.delete_adapters,
        diffusers/loaders/peft.py:801-806 -> delete_adapter_layers, diffusers/utils/peft_utils.py:232-246) calls
        every ``BaseTunerLayer.delete_adapter`` (peft/tuners/tuners_utils.py:2081) unconditionally and pops the
        config with a default, so it is safe to call whatever state the failure left."""
        with warnings.catch_warnings():
            # peft warns when the deleted adapter was a layer's active one; use() activates the right one next.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.pipe.delete_adapters([slot])

    def _keep_hotswapped_scaling(self, slot: str) -> None:
        """Make ``set_scale`` reproduce the scaling that the hotswap set from the new LoRA's own alpha and rank.

        PEFT's hotswap (peft/utils/hotswap.py:512-521) writes ``scaling[slot] = alpha / r`` of the *new* LoRA but
        leaves the layer's ``lora_alpha[slot]`` and ``r[slot]`` at the values of the adapter first loaded into the
        slot (diffusers does not touch them either, nor ``peft_config[slot]``). ``set_adapters`` then calls
        ``LoraLayer.set_scale`` (diffusers/utils/peft_utils.py:282-283), which recomputes
        ``scale * lora_alpha[slot] / r[slot]`` (peft/tuners/lora/layer.py:783-794) from those old values: a slot
        loaded with r4/alpha4 and hotswapped to r4/alpha16 would run at 1.0 instead of 4.0. Setting ``lora_alpha``
        to ``scaling * r`` (``* sqrt(r)`` with rsLoRA) makes that recomputation give the hotswapped value back.
        Layers the new LoRA does not target keep their values: the hotswap zeroed their weights
        (peft/utils/hotswap.py:495-504), so their scaling multiplies nothing."""
        for _, layer in self._lora_layers(slot):
            scaling = layer.scaling[slot]
            # prepare_model_for_compiled_hotswap may have made it a 0-d tensor (peft/utils/hotswap.py:57-80).
            scaling = float(scaling.item() if hasattr(scaling, "item") else scaling)
            rank = layer.r[slot]
            layer.lora_alpha[slot] = scaling * (math.sqrt(rank) if layer.use_rslora.get(slot, False) else rank)
