"""The console's fleet view, built from the router's caches: pools, placement, replicas, queues, recent latency."""

import pytest

from serve_app.domain.config import parse_config
from serve_app.domain.fleet import RecentLatencies, fleet_status, nearest_rank
from serve_app.domain.specs import resolve_application

Z_INT4 = "z-image-turbo-svdq-int4-r128"
EDIT_INT4 = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"


@pytest.fixture(scope="module")
def router_spec():
    """Z-Image alone on two pools, and an int4 swap group: swapping on a 4090, all resident on an A100."""
    config = parse_config({
        "models": {Z_INT4: {}, EDIT_INT4: {}, "z-image-turbo": {}},
        "swap_groups": [{"name": "mixed", "variants": [Z_INT4, EDIT_INT4], "host_ram_gib": 64}],
        "pools": [{"name": "rtx4090", "gpu_class": "rtx-4090"}, {"name": "a100", "gpu_class": "a100-80g"}]})
    return resolve_application(config).router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_latencies_are_nearest_rank_percentiles_over_the_window():
    clock = Clock()
    latencies = RecentLatencies(window_s=60, max_samples=100, clock=clock)
    assert latencies.summary("z") == {"count": 0, "p50_s": None, "p95_s": None, "window_s": 60}
    for seconds in range(1, 21):  # 1..20 s
        latencies.record("z", float(seconds))
    assert latencies.summary("z") == {"count": 20, "p50_s": 10.0, "p95_s": 19.0, "window_s": 60}
    clock.now += 61  # every answer is older than the window
    latencies.record("z", 0.5)
    assert latencies.summary("z") == {"count": 1, "p50_s": 0.5, "p95_s": 0.5, "window_s": 60}
    assert latencies.summary("other")["count"] == 0


def test_recent_latencies_keep_at_most_max_samples():
    latencies = RecentLatencies(window_s=60, max_samples=3, clock=Clock())
    for seconds in (100.0, 1.0, 2.0, 3.0):
        latencies.record("z", seconds)
    assert latencies.summary("z")["count"] == 3 and latencies.summary("z")["p95_s"] == 3.0


def test_nearest_rank_is_a_measured_value():
    assert nearest_rank([1.0, 2.0], 0.5) == 1.0 and nearest_rank([1.0, 2.0], 0.95) == 2.0
    assert nearest_rank([], 0.5) is None


def test_the_fleet_shows_pools_placement_replicas_queue_and_latency(router_spec, catalog):
    latencies = RecentLatencies()
    latencies.record("z-image-turbo", 2.0)
    states = {"gen-z-image-turbo@rtx4090": {"RUNNING": 2, "STARTING": 1},
              "swap-mixed@a100": {"RUNNING": 1}, "swap-mixed@rtx4090": {"STARTING": 1}}
    fleet = fleet_status(catalog, router_spec.routes, states, {"gen-z-image-turbo@rtx4090": 3}, latencies,
                         internals=True)
    assert fleet["object"] == "fleet" and fleet["internals"] is True
    pools = {p["pool"]: p for p in fleet["pools"]}
    assert pools["rtx4090"]["gpu_class"] == "rtx-4090" and pools["rtx4090"]["gpu_name"] == "RTX 4090"
    assert pools["a100"]["vram_gib"] == 79.6
    assert pools["a100"]["variants"] == sorted([EDIT_INT4, Z_INT4, "z-image-turbo"])
    variants = {v["id"]: v for v in fleet["variants"]}
    assert set(variants) == {"z-image-turbo", Z_INT4, EDIT_INT4}
    z = variants["z-image-turbo"]
    assert z["ready"] and z["queue_depth"] == 3 and z["latency"]["p50_s"] == 2.0
    on_4090 = next(r for r in z["routes"] if r["pool"] == "rtx4090")
    assert (on_4090["running"], on_4090["starting"], on_4090["placement"], on_4090["offload_mode"]) == (
        2, 1, "replicas", "model")
    edit = {r["pool"]: r for r in variants[EDIT_INT4]["routes"]}
    assert edit["rtx4090"]["placement"] == "swap_group" and edit["rtx4090"]["starting"] == 1
    assert edit["a100"]["placement"] == "resident_member" and edit["a100"]["running"] == 1
    assert variants[EDIT_INT4]["ready"] and variants[EDIT_INT4]["latency"]["count"] == 0


def test_without_internals_the_fleet_says_only_what_is_served_and_ready(router_spec, catalog):
    fleet = fleet_status(catalog, router_spec.routes, {"gen-z-image-turbo@a100": {"RUNNING": 1}}, {"x": 5},
                         RecentLatencies(), internals=False)
    assert set(fleet) == {"object", "internals", "variants"}
    assert {v["id"]: v for v in fleet["variants"]}["z-image-turbo"] == {
        "id": "z-image-turbo", "tasks": ["generate"], "ready": True}
    assert all(set(v) == {"id", "tasks", "ready"} for v in fleet["variants"])
    assert not {v["id"]: v for v in fleet["variants"]}[EDIT_INT4]["ready"]
