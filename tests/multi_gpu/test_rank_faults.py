"""A rank that dies or hangs fails its request with a complete 503 (JSON body, Retry-After), and Serve replaces
the replica with a new one whose ranks answer as one process does.

The faults are real: a rank's process is killed (SIGKILL) or stopped (SIGSTOP), by its process id, which the
replica reports. A killed rank is found at once, mid-call by rank 0 and while idle by the health check; a
stopped one by the collective timeout: rank 0 makes no step for ``COLLECTIVE_TIMEOUT_S`` (20 s here) and gives
up; the test waits that out once.
"""

from __future__ import annotations

import os
import signal
import time

from tests.multi_gpu.conftest import COLLECTIVE_TIMEOUT_S
from tests.multi_gpu.test_parallel_replicas import assert_same_images, both, rank_pids

# How long Serve may take to notice the failed health checks, stop the replica and start another here (a new
# placement group, two processes loading the tiny pipeline): generous, as the test only waits while it is not done.
REPLACED_WITHIN_S = 300


def replaced(deployment: str, old: list[int]) -> list[int]:
    """The ranks of the replica that replaced the one whose ranks were ``old``."""
    deadline = time.monotonic() + REPLACED_WITHIN_S
    while time.monotonic() < deadline:
        try:
            pids = rank_pids(deployment)
        except Exception:  # noqa: BLE001 - no replica to answer while Serve replaces it
            pids = old
        if not set(pids) & set(old):
            return pids
        time.sleep(1)
    raise AssertionError(f"{deployment} was not replaced within {REPLACED_WITHIN_S}s")


def assert_complete_503(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert "rank of this multi-GPU replica failed" in error["message"]


def replica_info(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, "parallel").info.remote().result(timeout_s=60)


def edit(http, prompt: str, steps: int, size: str = "128x128"):
    from tests.multi_gpu.test_parallel_replicas import png

    return http.post("/v1/images/edits", data={"model": "qwen-image-edit-2511", "prompt": prompt, "size": size,
                                               "num_inference_steps": steps, "seed": 4},
                     files=[("image[]", ("in.png", png((1, 2, 3)), "image/png"))])


def test_a_rank_killed_mid_call_fails_the_request_with_503_and_serve_replaces_the_replica(http):
    """The peer dies while the ranks denoise: rank 0 sees its process gone (through Ray, or its collective
    failing) and answers at once."""
    from concurrent.futures import ThreadPoolExecutor

    deployment = "edit-qwen-image-edit-2511"
    old = rank_pids(deployment)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(edit, http, "the peer is killed", 100, "256x256")  # seconds of denoising here
        deadline = time.monotonic() + REPLACED_WITHIN_S
        while replica_info(deployment)["running"] == 0:  # the call has reached the ranks
            assert not answer.done(), answer.result().text
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(old[1], signal.SIGKILL)
        assert_complete_503(answer.result())
    assert len(replaced(deployment, old)) == 2
    parallel, one = both(http, "qwen-image-edit-2511", prompt="after the kill", size="128x128",
                         num_inference_steps=2, seed=4)
    assert_same_images(parallel, one)


def test_a_rank_killed_while_idle_is_found_by_the_health_check(http):
    """No request needs to fail first: the replica's health check sees the peer's process gone."""
    deployment = "edit-qwen-image-edit-2511"
    old = rank_pids(deployment)
    os.kill(old[1], signal.SIGKILL)
    assert len(replaced(deployment, old)) == 2
    assert edit(http, "after an idle kill", 2).status_code == 200


def test_a_stopped_rank_fails_the_request_after_the_collective_timeout_and_is_replaced(http):
    deployment = "gen-z-image-turbo"
    old = rank_pids(deployment)
    os.kill(old[1], signal.SIGSTOP)
    try:
        started = time.monotonic()
        fields = {"prompt": "the peer was stopped", "size": "128x128", "num_inference_steps": 2, "seed": 4}
        assert_complete_503(http.post("/v1/images/generations", json={"model": "z-image-turbo", **fields}))
        assert time.monotonic() - started >= COLLECTIVE_TIMEOUT_S  # found by the timeout, not a closed socket
        assert len(replaced(deployment, old)) == 2
        parallel, one = both(http, "z-image-turbo", **fields)
        assert_same_images(parallel, one)
    finally:
        try:
            os.kill(old[1], signal.SIGCONT)  # if its replica's end has not killed it yet
        except ProcessLookupError:
            pass
