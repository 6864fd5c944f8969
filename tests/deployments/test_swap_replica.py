"""The swap replica without Ray: both tasks answered by one replica, swaps counted, the arbiter's grouping."""

from __future__ import annotations

import asyncio

import pytest

from deployments.swap_replica import GpuArbiter, SwapReplica
from serve_app.domain.config import parse_config
from serve_app.domain.errors import ModelNotFoundError
from serve_app.domain.schemas import EditRequest, GenerateRequest
from serve_app.domain.specs import resolve_application
from serve_app.embedded import tiny_model_config
from serve_app.engines import load_engine
from serve_app.engines.protocol import Job

GENERATE, EDIT = "z-image-turbo", "qwen-image-edit-2509"


def group_config(tiny_root, catalog, max_wait_s=4.0):
    return parse_config({
        "device": {"device": "cpu"},
        "serving": {"warmup": False},
        "models": {v: tiny_model_config(tiny_root, catalog.variant(v)) for v in (GENERATE, EDIT)},
        "swap_groups": [{"name": "one-gpu", "variants": [GENERATE, EDIT], "max_wait_s": max_wait_s}],
    })


class ParkCounting:
    """Loads the real engine and records each park and unpark it is asked for."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, spec):
        engine = load_engine(spec)
        park, unpark = engine.park, engine.unpark
        variant = spec.variant.id

        def parked():
            self.log.append(f"park {variant}")
            return park()

        def unparked():
            self.log.append(f"unpark {variant}")
            return unpark()

        engine.park, engine.unpark = parked, unparked
        return engine


@pytest.fixture
def swap_replica(tiny_root, catalog):
    made = []

    def make(max_wait_s=4.0, log=None):
        (group,) = resolve_application(group_config(tiny_root, catalog, max_wait_s)).swap_groups
        loaders = {v: ParkCounting(log) for v in group.variant_ids} if log is not None else None
        replica = SwapReplica(group, loaders)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.shutdown()


def generate(prompt="a red cube", seed=1):
    return GenerateRequest(prompt=prompt, seed=seed, num_inference_steps=2)


def edit(png_bytes):
    return EditRequest(prompt="make it blue", images=[png_bytes], seed=1, num_inference_steps=2)


def test_the_application_spec_puts_grouped_variants_in_one_deployment_with_shared_routes(tiny_root, catalog):
    spec = resolve_application(group_config(tiny_root, catalog))
    assert spec.replicas == ()
    (group,) = spec.swap_groups
    assert group.name == "swap-one-gpu" and group.variant_ids == (GENERATE, EDIT)
    assert {(r.variant, r.deployment, r.shared) for r in spec.router.routes} == {
        (GENERATE, "swap-one-gpu", True), (EDIT, "swap-one-gpu", True)}


def test_one_replica_answers_both_tasks_and_counts_its_swaps(swap_replica, png_bytes):
    log: list[str] = []
    replica = swap_replica(log=log)
    # At start each member loads and is parked before the next one loads; the first goes back on the GPU.
    assert log == [f"park {GENERATE}", f"park {EDIT}", f"unpark {GENERATE}"]
    log.clear()

    async def scenario():
        first = await replica.run(generate(), 64, 64, variant=GENERATE)
        edited = await replica.run(edit(png_bytes), 64, 64, variant=EDIT)
        again = await replica.run(generate(seed=2), 64, 64, variant=GENERATE)
        return first, edited, again

    first, edited, again = asyncio.run(scenario())
    assert (first.variant, edited.variant, again.variant) == (GENERATE, EDIT, GENERATE)
    assert first.pil_images()[0].size == edited.pil_images()[0].size == (64, 64)
    assert replica.arbiter.swaps == 2
    assert log == [f"park {GENERATE}", f"unpark {EDIT}", f"park {EDIT}", f"unpark {GENERATE}"]
    info = asyncio.run(replica.info())
    assert info["resident"] == [GENERATE] and info["swaps"] == 2 and info["co_resident"] is False
    # The swap series name the device as its members' series do.
    assert replica.metrics.tags["gpu_class"] == replica.members[GENERATE].gpu_class == "cpu"


def test_a_swap_changes_no_output(swap_replica):
    replica = swap_replica()

    async def scenario():
        before = await replica.run(generate(seed=7), 64, 64, variant=GENERATE)
        replica.members[GENERATE].engine.park()
        replica.members[GENERATE].engine.unpark()
        after = await replica.run(generate(seed=7), 64, 64, variant=GENERATE)
        return before, after

    before, after = asyncio.run(scenario())
    assert before.images == after.images


def test_a_call_naming_no_member_is_refused(swap_replica):
    replica = swap_replica()
    with pytest.raises(ModelNotFoundError, match="serves z-image-turbo, qwen-image-edit-2509"):
        asyncio.run(replica.run(generate(), 64, 64, variant="qwen-image-edit-2511"))


def test_mixed_requests_queued_together_run_grouped_by_variant(swap_replica, png_bytes):
    """Six requests alternating between the tasks, all queued while the GPU is busy: the resident variant's
    run first, then one swap for the others, not one swap per request."""
    replica = swap_replica(max_wait_s=60.0)

    async def scenario():
        calls = [replica.run(generate(seed=i), 64, 64, variant=GENERATE) if i % 2 == 0
                 else replica.run(edit(png_bytes), 64, 64, variant=EDIT) for i in range(6)]
        return await asyncio.gather(*calls)

    results = asyncio.run(scenario())
    assert [r.variant for r in results] == [GENERATE, EDIT] * 3
    assert replica.arbiter.swaps == 1


class _Member:
    """A member replica reduced to what the arbiter uses of ModelReplica's public face: its variant, engine,
    queue age and worker thread."""

    def __init__(self, variant_id: str, log: list[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from types import SimpleNamespace

        self.variant = SimpleNamespace(id=variant_id)
        self.queued_age: float | None = None
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.engine = SimpleNamespace(park=lambda: log.append(f"park {variant_id}") or 0,
                                      unpark=lambda: log.append(f"unpark {variant_id}") or 10)

    async def on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def oldest_queued_age(self) -> float | None:
        return self.queued_age


def test_with_no_turn_length_the_arbiter_serves_batches_first_come_first_served():
    """max_wait_s 0: the b batch that waited behind the first a batch goes before the second a batch."""
    log: list[str] = []
    members = {"a": _Member("a", log), "b": _Member("b", log)}
    swaps = []
    arbiter = GpuArbiter(members, max_wait_s=0.0, co_resident=False, on_swap=lambda *s: swaps.append(s))

    async def batch(variant, order):
        job = Job(generate(), 64, 64, 2)
        async with arbiter.turn(members[variant], [job]):
            order.append(variant)
            await asyncio.sleep(0)

    async def scenario():
        order: list[str] = []
        await asyncio.gather(batch("a", order), batch("a", order), batch("b", order))
        return order

    order = asyncio.run(scenario())
    assert order == ["a", "b", "a"]
    assert log == ["park a", "unpark b", "park b", "unpark a"]
    assert [(s[0], s[1], s[3]) for s in swaps] == [("a", "b", 10), ("b", "a", 10)]
    assert arbiter.swaps == 2
    for member in members.values():
        member.executor.shutdown()


def test_the_arbiter_holds_the_gpu_for_a_resident_member_whose_next_batch_is_still_forming():
    """The resident member has work queued but no batch at the gate yet (between two of its batches):
    a waiting batch of another member does not take the GPU from it."""
    log: list[str] = []
    members = {"a": _Member("a", log), "b": _Member("b", log)}
    arbiter = GpuArbiter(members, max_wait_s=60.0, co_resident=False)
    members["a"].queued_age = 0.5  # a's queue holds a request, its batch not formed yet

    async def scenario():
        job = Job(generate(), 64, 64, 2)
        waiting = asyncio.ensure_future(_enter(arbiter, members["b"], job))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # b waits: a keeps its turn
        members["a"].queued_age = None
        await _enter(arbiter, members["a"], Job(generate(), 64, 64, 2))
        await waiting

    asyncio.run(scenario())
    assert log == ["park a", "unpark b"]
    for member in members.values():
        member.executor.shutdown()


async def _enter(arbiter, member, job):
    async with arbiter.turn(member, [job]):
        pass


def test_a_co_resident_group_never_swaps():
    log: list[str] = []
    members = {"a": _Member("a", log), "b": _Member("b", log)}
    arbiter = GpuArbiter(members, max_wait_s=0.0, co_resident=True)

    async def scenario():
        for variant in ("a", "b", "a", "b"):
            await _enter(arbiter, members[variant], Job(generate(), 64, 64, 2))

    asyncio.run(scenario())
    assert arbiter.swaps == 0 and log == []
    for member in members.values():
        member.executor.shutdown()

