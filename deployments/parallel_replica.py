"""Multi-GPU replicas: one Serve replica whose engine runs in one process per GPU of a node.

Serve places the replica in a placement group of one bundle per rank, packed on one node (``STRICT_PACK``, as
ray.serve.llm does for tensor-parallel vLLM). The replica's own process is rank 0 and holds the first bundle;
a ``RankWorker`` actor holds each other one. The ranks join one process group (NCCL on CUDA, gloo on CPU) and
load the pipeline with the spec's parallel mode (``serve_app.engines.parallel``).

``ParallelEngine`` is the engine the replica sees (``ImageEngine``): every call goes to every rank with the same
jobs and seeds, and rank 0's images are the answer. What holds across ranks, and why:

* a call is never stopped part-way: a rank that left between steps would leave the others waiting in a
  collective. A cancelled job's call runs to its end on every rank and its images are dropped (the replica has
  stopped listening); nothing of it survives the call;
* a rank that dies, or goes silent (no denoising step done on rank 0 for ``collective_timeout_s``, or no answer
  from a peer that long after rank 0's), raises ``RankFailure``: the replica answers 503 and fails its health
  checks, and Serve replaces it; the workers, owned by the replica's actor, go with it;
* previews, batching and per-request LoRAs run on every rank alike; rank 0 alone hands previews on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import ray

from serve_app.domain.schemas import MAX_SEED
from serve_app.domain.specs import EngineSpec, ReplicaSpec
from serve_app.engines import EngineLoader, load_engine
from serve_app.engines.parallel import RankGroup
from serve_app.engines.protocol import EngineInfo, EngineResult, ImageEngine, Job, LoraState, RankFailure

logger = logging.getLogger(__name__)
# How often rank 0's caller looks at its heartbeat and at the peers' calls while rank 0 computes.
WATCH_INTERVAL_S = 0.5


def rank_bundle(spec: ReplicaSpec, actor_options: dict[str, Any]) -> dict[str, float]:
    """One rank's share of the placement group: the replica's own CPUs, GPU and node markers."""
    bundle = {"CPU": actor_options.get("num_cpus") or 0.1}
    if actor_options.get("num_gpus"):
        bundle["GPU"] = actor_options["num_gpus"]
    bundle.update(actor_options.get("resources") or {})
    return bundle


def placement_options(spec: ReplicaSpec, actor_options: dict[str, Any]) -> dict[str, Any]:
    """The Serve options that give a replica of ``spec`` one bundle per rank on one node."""
    return {"placement_group_bundles": [rank_bundle(spec, actor_options)] * spec.engine.ranks,
            "placement_group_strategy": "STRICT_PACK"}


PeerJob = tuple  # (request, width, height, num_inference_steps): a Job without the caller's event and hooks


def _peer_job(job: Job) -> PeerJob:
    """What a peer rank runs of ``job``, as it travels (a ``Job`` holds a threading event, which does not)."""
    return job.request, job.width, job.height, job.num_inference_steps


def _seeded(job: Job) -> Job:
    """``job`` with its seed drawn here when the request left it to the engine: every rank must draw the same."""
    if job.request.seed is not None:
        return job
    seed = secrets.randbelow(MAX_SEED - job.request.n)
    return dataclasses.replace(job, request=job.request.model_copy(update={"seed": seed}))


# Two calls at once: ``pid`` answers (a liveness probe) while ``run`` holds the other slot for a whole call.
@ray.remote(max_concurrency=2)
class RankWorker:
    """Rank 1..N-1 of a multi-GPU replica: joins the group, loads the same engine, runs what rank 0 sends."""

    def __init__(self, spec: EngineSpec, group: RankGroup, torch_threads: int | None) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        group.join()
        self.engine = load_engine(spec)

    def pid(self) -> int:
        return os.getpid()

    def warm_up(self) -> None:
        self.engine.warm_up()

    def run(self, jobs: list[PeerJob]) -> int:
        return len(self.engine.run([Job(*job) for job in jobs], should_stop=lambda: False))


class ParallelEngine:
    """Rank 0's engine and its peers as one ``ImageEngine`` (the module docstring says how calls go)."""

    def __init__(self, local: ImageEngine, workers: Sequence[Any], timeout_s: float) -> None:
        self.local = local
        self.workers = list(workers)
        self.timeout_s = timeout_s
        self.variant = local.variant
        self.spec = getattr(local, "spec", None)
        self._beat = time.monotonic()
        self._broken: str | None = None

    @property
    def info(self) -> EngineInfo:
        return self.local.info

    def batch_key(self, job: Job) -> Hashable:
        return self.local.batch_key(job)

    def park(self) -> int:
        raise RankFailure("a multi-GPU replica is never parked (config refuses parallel swap-group members)")

    unpark = park

    def lora_state(self) -> LoraState:
        return self.local.lora_state()

    def reset_peak_memory(self) -> None:
        self.local.reset_peak_memory()

    def peak_memory_bytes(self) -> int | None:
        return self.local.peak_memory_bytes()

    def pids(self) -> list[int]:
        """Process ids of every rank, rank 0 first."""
        return [os.getpid(), *ray.get([w.pid.remote() for w in self.workers], timeout=self.timeout_s)]

    def warm_up(self) -> None:
        self._on_every_rank([w.warm_up.remote() for w in self.workers], self.local.warm_up)

    def dead_peer(self, timeout_s: float = 10.0) -> str | None:
        """Why a peer's process is gone, or None. A peer that is merely slow to answer is not judged here: a
        silent rank is the collective timeout's to find, during a call."""
        if self._broken is not None:
            return self._broken
        refs = [w.pid.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                self._broken = f"a peer rank's process is gone: {type(err).__name__}"
                return self._broken
        return None

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        """Every rank runs ``jobs``; rank 0's results. ``should_stop`` is not obeyed (the module docstring)."""
        jobs = [_seeded(job) for job in jobs]
        peers = [_peer_job(job) for job in jobs]
        refs = [w.run.remote(peers) for w in self.workers]
        return self._on_every_rank(refs, lambda: self.local.run(jobs, should_stop=self._heartbeat))

    def _heartbeat(self) -> bool:
        self._beat = time.monotonic()
        return False

    def _on_every_rank(self, refs: list, call: Callable[[], Any]) -> Any:
        """``call()`` on rank 0 beside the peers' ``refs``; raises ``RankFailure`` once any rank fails or stays
        silent, and on every call after (the group cannot recover)."""
        if self._broken is not None:
            raise RankFailure(self._broken)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def rank_zero() -> None:
            try:
                outcome["result"] = call()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = err
            finally:
                done.set()

        self._beat = time.monotonic()
        threading.Thread(target=rank_zero, name="rank-0", daemon=True).start()
        while not done.wait(WATCH_INTERVAL_S):
            self._check_peers(refs)
            if time.monotonic() - self._beat > self.timeout_s:
                self._fail(f"rank 0 made no step for {self.timeout_s:g}s: a peer is stuck in a collective")
        self._check_peers(refs)
        error = outcome.get("error")
        if error is not None and _is_collective_error(error):
            self._fail(f"rank 0's collective failed: {type(error).__name__}: {str(error)[:200]}")
        try:
            ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._fail(f"a peer rank did not finish within {self.timeout_s:g}s of rank 0")
        except ray.exceptions.RayTaskError as err:
            if error is None:  # rank 0 finished and a peer did not: the ranks parted ways
                self._fail(f"a peer rank failed: {str(err)[:200]}")
            # Every rank failed the call (the same inputs fail alike) and left it: the group is intact.
        except ray.exceptions.RayError as err:
            self._fail(f"a peer rank failed: {type(err).__name__}: {str(err)[:200]}")
        if error is not None:
            raise error
        return outcome["result"]

    def _check_peers(self, refs: list) -> None:
        """Fail at once when a peer's process is gone (its call cannot end; rank 0 would wait on it)."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError:
                pass  # the peer's call raised; whether that breaks the group is decided once rank 0's ends
            except ray.exceptions.RayError as err:
                self._fail(f"a peer rank failed: {type(err).__name__}: {str(err)[:200]}")

    def _fail(self, why: str) -> None:
        self._broken = why
        logger.error("%s: %s", self.variant.id, why)
        raise RankFailure(why)


def _is_collective_error(err: BaseException) -> bool:
    """Whether rank 0's own call failed in a collective (a peer gone or timed out), not in its own work."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(word in text for word in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "Gloo", "gloo"))


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def load_parallel_engine(spec: EngineSpec, torch_threads: int | None = None,
                         loader: EngineLoader | None = None) -> ParallelEngine:
    """Start ranks 1..N-1 in the replica's placement group (when it has one), join them as rank 0, and load."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    address = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
    workers = []
    for rank in range(1, spec.ranks):
        options: dict[str, Any] = {"num_cpus": 0}
        if group is not None:
            bundle = group.bundle_specs[rank]
            options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0),
                       "scheduling_strategy": PlacementGroupSchedulingStrategy(
                           group, placement_group_bundle_index=rank)}
        workers.append(RankWorker.options(**options).remote(
            spec, RankGroup(rank, spec.ranks, address, spec.collective_timeout_s), torch_threads))
    RankGroup(0, spec.ranks, address, spec.collective_timeout_s).join()
    local = (loader or load_engine)(spec)
    engine = ParallelEngine(local, workers, spec.collective_timeout_s)
    engine.pids()  # every rank loaded: a peer's load error surfaces here, at the replica's start
    return engine
