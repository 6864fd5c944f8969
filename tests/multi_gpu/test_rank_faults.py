"""A rank that dies or hangs fails its request with a complete 503 (JSON body, Retry-After), and Serve replaces
the replica with a new one whose ranks answer as one process does.

The faults are real: a rank's process is killed (SIGKILL) or stopped (SIGSTOP), by its process id, which the
replica reports. A stopped rank is found by the collective timeout: rank 0 makes no step for
``COLLECTIVE_TIMEOUT_S`` (20 s here) and gives up; the test waits that out once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

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


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_failed_rank_answers_503_and_serve_replaces_the_replica(http, how):
    deployment, model = {"killed": ("edit-qwen-image-edit-2511", "qwen-image-edit-2511"),
                         "stopped": ("gen-z-image-turbo", "z-image-turbo")}[how]
    old = rank_pids(deployment)
    peer = old[1]
    os.kill(peer, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        started = time.monotonic()
        fields = {"prompt": f"the peer was {how}", "size": "128x128", "num_inference_steps": 2, "seed": 4}
        if model == "z-image-turbo":
            response = http.post("/v1/images/generations", json={"model": model, **fields})
        else:
            from tests.multi_gpu.test_parallel_replicas import png

            response = http.post("/v1/images/edits", data={"model": model, **fields},
                                 files=[("image[]", ("in.png", png((1, 2, 3)), "image/png"))])
        assert_complete_503(response)
        if how == "stopped":  # found by the timeout, not by a closed connection
            assert time.monotonic() - started >= COLLECTIVE_TIMEOUT_S
        new = replaced(deployment, old)
        assert len(new) == 2
        parallel, one = both(http, model, **fields)
        assert_same_images(parallel, one)
    finally:
        if how == "stopped":
            try:
                os.kill(peer, signal.SIGCONT)  # if its replica's end has not killed it yet
            except ProcessLookupError:
                pass
