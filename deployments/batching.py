"""The replica's batch queue: requests grouped by batch key, one batch at a time, interactive work first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


class Requeue:
    """A batch runner's outcome for an item it stopped to make way for interactive work: the item goes back to the
    head of its line, keeping its place, and runs again later."""


REQUEUE = Requeue()


@dataclass
class _Entry(Generic[Item]):
    item: Item
    size: int
    future: asyncio.Future
    background: bool = False
    arrived: float = field(default_factory=time.monotonic)


class BatchQueue(Generic[Item]):
    """Group items by key into batches of at most ``max_size`` (counted by ``size_of``); run one at a time.

    Ray's ``@serve.batch`` collects every call into one list whatever its shape and needs a replica
    context; a pipeline call can only batch requests that share size, steps and guidance. This queue
    keeps one line per key, and the oldest line goes first. A request that finds the replica idle
    waits up to ``wait_s`` for company (bench/throughput.py measures what that costs a lone client);
    skipping that wait after lone batches was tried and measured worse, as closed-loop clients then
    fall into split batches and stay there. An item of ``max_size`` or more runs alone.

    Args:
        run_batch: awaited with a list of items of one key; returns one outcome per item (a
            result, or an exception instance that the item's caller gets raised).
        max_size: the most size units (images) one batch may hold.
        wait_s: how long the oldest waiting item may wait for others while the runner is idle.
        Background items (batch lines) never share a batch with interactive ones, and a line of them runs only while no
    interactive item waits. An interactive item that arrives while a background batch runs calls ``preempt``: the
    runner stops that batch at its next denoising step and returns ``REQUEUE`` for its items, which go back to the
    head of their line. Interactive latency then grows by about one step, not by one whole image.

        size_of: size units of an item (1 when None).
        preempt: called when interactive work arrives while a background batch runs.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[list[Any]]], max_size: int, wait_s: float,
                 size_of: Callable[[Item], int] | None = None, preempt: Callable[[], None] | None = None) -> None:
        self._run_batch = run_batch
        self.max_size = max_size
        self.wait_s = wait_s
        self._size_of = size_of or (lambda item: 1)
        self._lines: dict[Hashable, list[_Entry[Item]]] = {}
        self._changed: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._preempt = preempt
        self.running_background = False
        self.preemptions = 0

    async def submit(self, key: Hashable, item: Item, background: bool = False) -> Any:
        """Queue ``item`` and return its outcome once its batch ran (raising a returned exception). ``background``:
        work nobody waits for, run only while no interactive item waits."""
        if self._dispatcher is None or self._dispatcher.done():
            self._changed = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        entry = _Entry(item, self._size_of(item), asyncio.get_running_loop().create_future(), background)
        self._lines.setdefault((background, key), []).append(entry)
        if not background and self.running_background and self._preempt is not None:
            self.preemptions += 1
            self._preempt()
        self._changed.set()
        outcome = await entry.future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def pending(self) -> int:
        """Items waiting for a batch (not those running)."""
        return sum(1 for line in self._lines.values() for e in line if not e.future.done())

    def oldest_age(self) -> float | None:
        """Seconds the longest-waiting item (not running) has waited, or None when none waits."""
        now = time.monotonic()
        return max((now - e.arrived for line in self._lines.values() for e in line if not e.future.done()),
                   default=None)

    def _next_batch(self, now: float) -> tuple[Hashable, list[_Entry[Item]] | None, float | None]:
        """The batch to run now and its line's key, or None and how long until the oldest line is due."""
        for key in list(self._lines):
            self._lines[key] = [e for e in self._lines[key] if not e.future.cancelled()]
            if not self._lines[key]:
                del self._lines[key]
        if not self._lines:
            return None, None, None
        interactive = [k for k in self._lines if not k[0]]
        key = min(interactive or self._lines, key=lambda k: self._lines[k][0].arrived)
        line = self._lines[key]
        due_in = line[0].arrived + self.wait_s - now
        if sum(e.size for e in line) < self.max_size and due_in > 0:
            return None, None, due_in
        batch, total = [], 0
        while line and (not batch or total + line[0].size <= self.max_size):
            total += line[0].size
            batch.append(line.pop(0))
        if not line:
            del self._lines[key]
        return key, batch, None

    async def _dispatch(self) -> None:
        while True:
            key, batch, due_in = self._next_batch(time.monotonic())
            if batch is None:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), due_in)
                except asyncio.TimeoutError:
                    pass
                continue
            self.running_background = batch[0].background
            try:
                outcomes = await self._run_batch([e.item for e in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch runner returned {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
                outcomes = [err] * len(batch)
            finally:
                self.running_background = False
            requeued = [e for e, outcome in zip(batch, outcomes, strict=True) if outcome is REQUEUE]
            if requeued:
                self._lines.setdefault(key, [])[:0] = requeued
            for entry, outcome in zip(batch, outcomes, strict=True):
                if outcome is REQUEUE:
                    continue
                if not entry.future.done():
                    entry.future.set_result(outcome)
