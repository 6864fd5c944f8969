"""Per-request LoRAs on a loaded pipeline, through diffusers' PEFT integration.

A replica keeps up to ``max_loaded_loras`` adapters in its transformer, each in a *slot* (a PEFT adapter
name), least recently used first. A request names one LoRA and a scale; ``LoraAdapters.use`` makes that
adapter the only active one at that scale, or turns every adapter off for a request without one. A LoRA
that is not loaded takes a free slot, or replaces the least recently used adapter in place: PEFT's hotswap
copies the new weights into the old adapter's tensors, so no module is created or dropped (and a later
compiled transformer would not recompile). ``enable_lora_hotswap`` pads every slot to the largest rank of
the allow-list, so any listed LoRA fits any slot.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from safetensors import safe_open

from serve_app.domain.config import HFConfig
from serve_app.domain.errors import UnsupportedValueError
from serve_app.domain.schemas import LoraRequest
from serve_app.domain.specs import LoraSpec
from serve_app.engines.protocol import ModelLoadError

logger = logging.getLogger(__name__)

LoraOutcome = Literal["hit", "load", "hotswap"]


def lora_file(spec: LoraSpec, hf: HFConfig) -> Path:
    """The local weight file of ``spec``: its file, the file in its folder, or its hub file from the cache."""
    from serve_app.engines.base import weight_file

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
            slot = next(f"slot{i}" for i in range(self.capacity) if f"slot{i}" not in used)
            self._load_into(slot, name, hotswap=False)
            return "load"
        evicted, slot = self._slots.popitem(last=False)
        logger.info("LoRA %s replaces %s (least recently used) in adapter %s", name, evicted, slot)
        try:
            self._load_into(slot, name, hotswap=True)
        except ModelLoadError:
            # PEFT refuses a hotswap whose targets differ from the slot's: load the LoRA afresh instead.
            self._load_into(slot, name, hotswap=False)
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
            if slot in self.pipe.get_list_adapters().get("transformer", []):
                self.pipe.delete_adapters([slot])
            raise ModelLoadError(f"loading LoRA {name} from {path} failed: {type(err).__name__}: {err}") from err
        self._slots[name] = slot
