"""Host copies of a pipeline's weights: what a GPU shared by several variants parks in RAM and copies back.

A swap group (docs/single-gpu.md) keeps every member's weights in host RAM; the member on the GPU also has
them there. ``HostCopies.park`` points every weight of some modules at its host copy and frees the GPU copy;
``restore`` copies them back. No disk is read after the first load.

How the host copies are laid out, and why:

* **One flat buffer per module**, every tensor at an aligned offset in it. PyTorch's caching host allocator
  rounds each pinned (page-locked) allocation up to a power of two (ATen/core/CachingHostAllocator.h), so
  pinning tensor by tensor takes 1.5-1.9x the weights: 60.1 GiB for the 38.1 GiB Qwen-Image transformer and
  17.3 GiB for the 11.5 GiB Z-Image one (``bench/pinned_host.py`` computes both from the real configs). A
  flat buffer costs the weights plus the alignment padding, which the planner's host-RAM check
  (``plan_swap_group``) can count as weights.
* **Pinned by registration.** A flat buffer is ordinary memory that ``cudaHostRegister`` page-locks in place,
  at its exact size: pinning it through the caching allocator would round the whole buffer up instead.
* **Tensor subclasses by their inner tensors.** torchao's fp8 weights (``Float8Tensor``) are wrapper subclasses:
  their data lives in inner tensors (``qdata``, ``scale``). Assigning ``param.data`` replaces only the wrapper
  and leaves the inner tensors on the GPU, and ``pin_memory`` on the wrapper raises before torchao 0.18. So a
  subclass is flattened into its inner tensors (``__tensor_flatten__``), each laid out like any plain tensor,
  and parking and restoring replace those inner tensors on the wrapper.

Weights keep their identity (plain parameters through ``.data``, subclasses through their inner tensors), so
anything holding them (offload hooks, a compiled graph's guards) still finds them. Tied weights are moved
once. The weights must not change after the first park: the host copy is taken once (the config refuses
per-request LoRAs, which load into the transformer, in swap groups).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Every tensor starts at a multiple of this in its buffer: any dtype's view needs its element size, and DMA
# copies run at full rate from 256-byte aligned addresses (cudaMalloc's own alignment).
ALIGNMENT = 256


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


def flat_layout(sizes: Sequence[int], alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes`` bytes packed in order into one buffer, and the buffer's size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += aligned(size, alignment)
    return offsets, end


def power_of_two_bytes(nbytes: int) -> int:
    """What PyTorch's caching host allocator takes for one pinned allocation of ``nbytes``."""
    return 1 << max(nbytes - 1, 0).bit_length()


@dataclass(frozen=True)
class _Piece:
    """One plain tensor of a slot, at ``offset`` in its module's flat buffer."""

    offset: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    nbytes: int

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """The piece inside ``buffer``, with its own dtype, size and strides."""
        raw = buffer[self.offset:self.offset + self.nbytes].view(self.dtype)
        return raw.as_strided(self.size, self.stride)

    def empty(self, device: str | torch.device) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=device)


def _dense_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s strides when they cover its elements exactly once (any dimension order), else contiguous
    strides: the layout the host copy keeps."""
    order = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d))
    expected = 1
    for dim in order:
        if tensor.size(dim) != 1 and tensor.stride(dim) != expected:
            return torch.empty(tensor.size(), device="meta").stride()
        expected *= tensor.size(dim)
    return tuple(tensor.stride())


@dataclass
class _Slot:
    """One weight of a module (a parameter or a buffer) and where its host copy lives."""

    owner: torch.nn.Module
    name: str
    is_parameter: bool
    buffer: int  # index of the module's flat buffer
    pieces: list[_Piece]
    inner_names: tuple[str, ...] | None = None  # a wrapper subclass' inner tensors, as __tensor_flatten__ names them

    def current(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_parameter else self.owner._buffers)[self.name]

    def on_device(self) -> bool:
        """Whether this weight's data is off the host (a subclass by its inner tensors)."""
        tensor = self.current()
        inner = [getattr(tensor, name) for name in self.inner_names] if self.inner_names else [tensor]
        return any(t.device.type != "cpu" for t in inner)

    def put(self, inner: list[torch.Tensor]) -> None:
        """Make ``inner`` this weight's data (its plain tensor, or a subclass' inner tensors in flatten order),
        keeping the weight object itself."""
        if self.inner_names is not None:
            # The wrapper stays, its inner tensors change. torch.utils.swap_tensors would also move the wrapper's
            # device, but it refuses a tensor with weak references, and a compiled transformer's guards hold
            # some; a parked member never runs, and the restore puts data back on the wrapper's device.
            tensor = self.current()
            for name, value in zip(self.inner_names, inner, strict=True):
                setattr(tensor, name, value)
        elif self.is_parameter:
            self.owner._parameters[self.name].data = inner[0]
        else:
            self.owner._buffers[self.name] = inner[0]


def _inner_tensors(tensor: torch.Tensor, where: str) -> tuple[list[torch.Tensor], tuple[str, ...] | None]:
    """The plain tensors holding ``tensor``'s data, and their attribute names on it (None for a plain tensor)."""
    if not is_traceable_wrapper_subclass(tensor):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: a {type(tensor).__name__} cannot be parked in host RAM (not a plain tensor or "
                            "a traceable wrapper subclass)")
        return [tensor.detach()], None
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    if any(is_traceable_wrapper_subclass(t) for t in inner):
        raise TypeError(f"{where}: {type(tensor).__name__} nests another tensor subclass; only one level is parked")
    return [t.detach() for t in inner], tuple(names)


class HostCopies:
    """Every weight of some modules, kept in host RAM, so their device copy can be dropped (``park``) and put
    back (``restore``) without reading the disk.

    Args:
        modules: the modules whose parameters and buffers move (a pipeline's components).
        pin: page-lock the host buffers (on a machine with CUDA), so copies back run at the link's full rate.
        cudart: the CUDA runtime binding used to pin (``torch.cuda.cudart()`` when None); tests pass a double.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], pin: bool, cudart: Any = None) -> None:
        self._modules = list(modules)
        self._slots: list[_Slot] | None = None
        self._buffers: list[torch.Tensor] = []
        self._cudart = cudart if cudart is not None else (torch.cuda.cudart() if pin and torch.cuda.is_available()
                                                          else None)
        self._pin = pin and self._cudart is not None
        self.pinned_bytes = 0

    @property
    def host_bytes(self) -> int:
        """Bytes of host RAM the copies take (0 before the first park)."""
        return sum(buffer.numel() for buffer in self._buffers)

    def _take_copies(self) -> list[_Slot]:
        """Lay out every weight in one flat buffer per module and copy it there (the first park)."""
        slots: list[_Slot] = []
        seen: set[int] = set()
        for index, module in enumerate(self._modules):
            found: list[tuple[torch.nn.Module, str, bool, list[torch.Tensor], tuple[str, ...] | None]] = []
            for owner_name, owner in module.named_modules():
                for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None or id(tensor) in seen:
                            continue
                        seen.add(id(tensor))  # tied weights: moved once, with the first module that holds them
                        inner, names = _inner_tensors(tensor, f"{owner_name or type(module).__name__}.{name}")
                        found.append((owner, name, is_parameter, inner, names))
            inner_tensors = [t for *_, inner, _ in found for t in inner]
            offsets, total = flat_layout([t.numel() * t.element_size() for t in inner_tensors])
            buffer = torch.empty(total, dtype=torch.uint8)
            self._buffers.append(buffer)
            if self._pin and total:
                self._register(buffer)
            places = iter(zip(inner_tensors, offsets, strict=True))
            for owner, name, is_parameter, inner, names in found:
                pieces = []
                for tensor, offset in (next(places) for _ in inner):
                    piece = _Piece(offset, tensor.dtype, tuple(tensor.size()), _dense_strides(tensor),
                                   tensor.numel() * tensor.element_size())
                    piece.view(buffer).copy_(tensor)
                    pieces.append(piece)
                slots.append(_Slot(owner, name, is_parameter, index, pieces, names))
        return slots

    def _register(self, buffer: torch.Tensor) -> None:
        """Page-lock ``buffer`` in place at its exact size; unregistered when these copies are collected."""
        pointer, size = buffer.data_ptr(), buffer.numel()
        error = int(self._cudart.cudaHostRegister(pointer, size, 0))
        if error:  # cudaSuccess is 0
            raise RuntimeError(f"cudaHostRegister could not page-lock {size / 2**30:.2f} GiB of host RAM (CUDA error "
                               f"{error}); set pin_host_memory: false on the swap group to use pageable copies")
        self.pinned_bytes += size
        # Runs before this object's attributes (the buffers) are released: unregistered while still allocated.
        weakref.finalize(self, _unregister, self._cudart, pointer)


    def park(self) -> int:
        """Point every weight at its host copy (made on the first park) and free the device memory; returns the
        bytes that left a device."""
        if self._slots is None:
            self._slots = self._take_copies()
        moved = 0
        for slot in self._slots:
            if slot.on_device():
                moved += sum(piece.nbytes for piece in slot.pieces)
            slot.put([piece.view(self._buffers[slot.buffer]) for piece in slot.pieces])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return moved

    def restore(self, device: str) -> int:
        """Copy every weight to ``device`` from its host copy; returns the bytes copied (0 before a park, and
        0 for ``cpu``, where the copy stands in for a device in tests)."""
        if self._slots is None:
            return 0
        moved = 0
        for slot in self._slots:
            buffer = self._buffers[slot.buffer]
            slot.put([piece.empty(device).copy_(piece.view(buffer), non_blocking=self._pin) for piece in slot.pieces])
            if device != "cpu":
                moved += sum(piece.nbytes for piece in slot.pieces)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return moved


def _unregister(cudart: Any, pointer: int) -> None:
    cudart.cudaHostUnregister(pointer)


def per_tensor_pinned_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """What pinning each of ``tensors`` on its own (``tensor.pin_memory()``) takes from the caching host
    allocator: every allocation rounded up to a power of two."""
    return sum(power_of_two_bytes(t.numel() * t.element_size()) for t in tensors)


def flat_bytes(modules: Sequence[torch.nn.Module]) -> int:
    """What ``HostCopies`` takes for ``modules``: their weights (tied ones once) packed at ``ALIGNMENT``."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        sizes = []
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                inner, _ = _inner_tensors(tensor, type(module).__name__)
                sizes += [t.numel() * t.element_size() for t in inner]
        total += flat_layout(sizes)[1]
    return total

