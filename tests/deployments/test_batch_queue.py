"""The batch queue on its own: grouping, sizes, waiting, cancellation and errors."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batching import BatchQueue


class Recorder:
    """A batch runner that records each batch and answers item * 10 (or the item if it is an error)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay_s = delay_s

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        return [item if isinstance(item, Exception) else item * 10 for item in items]


def test_items_with_one_key_form_one_batch_and_keys_never_mix():
    runner = Recorder()

    async def main():
        queue = BatchQueue(runner, max_size=4, wait_s=0.05)
        return await asyncio.gather(queue.submit("a", 1), queue.submit("b", 2), queue.submit("a", 3))

    assert asyncio.run(main()) == [10, 20, 30]
    assert runner.batches == [[1, 3], [2]]


def test_a_full_batch_runs_without_waiting_and_sizes_count_units():
    runner = Recorder()

    async def main():
        queue = BatchQueue(runner, max_size=4, wait_s=60, size_of=lambda item: item)
        return await asyncio.wait_for(asyncio.gather(*(queue.submit("k", i) for i in (2, 2, 1, 3))), 5)

    assert asyncio.run(main()) == [20, 20, 10, 30]
    assert runner.batches[0] == [2, 2]  # full at 4 units: ran at once, 60 s wait notwithstanding
    assert sum(map(len, runner.batches)) == 4


def test_an_item_as_large_as_a_batch_or_larger_runs_alone():
    runner = Recorder()

    async def main():
        queue = BatchQueue(runner, max_size=2, wait_s=60, size_of=lambda item: item)
        return await asyncio.wait_for(asyncio.gather(queue.submit("k", 3), queue.submit("k", 2)), 5)

    assert asyncio.run(main()) == [30, 20]
    assert runner.batches == [[3], [2]]


def test_items_arriving_while_a_batch_runs_join_the_next_batch():
    batches = []
    first_started, release_first = asyncio.Event(), asyncio.Event()

    async def runner(items):
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            await release_first.wait()
        return [item * 10 for item in items]

    async def main():
        queue = BatchQueue(runner, max_size=8, wait_s=0.0)
        first = asyncio.ensure_future(queue.submit("k", 0))
        await first_started.wait()  # the first batch [0] is running now
        rest = [asyncio.ensure_future(queue.submit("k", i)) for i in (1, 2, 3)]
        while queue.pending() < 3:
            await asyncio.sleep(0)
        release_first.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [0, 10, 20, 30]
    assert batches == [[0], [1, 2, 3]]


def test_a_cancelled_waiting_item_is_left_out_of_its_batch():
    runner = Recorder()

    async def main():
        # Sizes count: the batch is due only when it holds 4 units, so nothing runs before the cancel.
        queue = BatchQueue(runner, max_size=4, wait_s=60, size_of=lambda item: item)
        gone = asyncio.ensure_future(queue.submit("k", 1))
        kept = asyncio.ensure_future(queue.submit("k", 2))
        while queue.pending() < 2:
            await asyncio.sleep(0)
        gone.cancel()
        filler = asyncio.ensure_future(queue.submit("k", 2))
        return await asyncio.wait_for(asyncio.gather(kept, filler), 5)

    assert asyncio.run(main()) == [20, 20]
    assert runner.batches == [[2, 2]]


def test_an_error_outcome_is_raised_to_its_caller_only():
    runner = Recorder()

    async def main():
        queue = BatchQueue(runner, max_size=4, wait_s=0.05)
        return await asyncio.gather(queue.submit("k", 1), queue.submit("k", KeyError("bad")),
                                    return_exceptions=True)

    ok, failed = asyncio.run(main())
    assert ok == 10 and isinstance(failed, KeyError)


def test_a_runner_that_raises_fails_the_whole_batch_and_the_queue_goes_on():
    calls = []

    async def flaky(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        queue = BatchQueue(flaky, max_size=2, wait_s=0.0)
        with pytest.raises(RuntimeError, match="boom"):
            await queue.submit("k", 1)
        return await queue.submit("k", 2)

    assert asyncio.run(main()) == 2



def test_background_items_wait_while_interactive_ones_do_and_a_preempted_batch_runs_again_later():
    """A background (batch) line runs only while no interactive item waits; an interactive item that arrives
    while one runs preempts it, and the stopped items go back to the head of their line."""
    from deployments.batching import REQUEUE

    order: list[list] = []

    async def main():
        stop = asyncio.Event()
        started = asyncio.Event()

        async def run(items):
            order.append(list(items))
            if items[0] == "bg-1" and len(order) == 1:  # the first background batch runs until preempted
                started.set()
                await stop.wait()
                return [REQUEUE] * len(items)
            return [f"done {item}" for item in items]

        queue = BatchQueue(run, max_size=1, wait_s=0.0, preempt=stop.set)
        first = asyncio.ensure_future(queue.submit("k", "bg-1", background=True))
        second = asyncio.ensure_future(queue.submit("k", "bg-2", background=True))
        await started.wait()
        interactive = await queue.submit("k", "fg")
        assert not first.done() and not second.done()
        return interactive, await first, await second, queue.preemptions

    interactive, first, second, preemptions = asyncio.run(main())
    assert (interactive, first, second, preemptions) == ("done fg", "done bg-1", "done bg-2", 1)
    assert order == [["bg-1"], ["fg"], ["bg-1"], ["bg-2"]]


def test_background_and_interactive_items_never_share_a_batch():
    runner = Recorder()

    async def main():
        queue = BatchQueue(runner, max_size=4, wait_s=0.05)
        return await asyncio.gather(queue.submit("a", 1, background=True), queue.submit("a", 2),
                                    queue.submit("a", 3, background=True), queue.submit("a", 4))

    assert asyncio.run(main()) == [10, 20, 30, 40]
    assert runner.batches == [[2, 4], [1, 3]]  # the interactive line first, though a background item came first
