"""The routing policy, without Ray."""

import pytest

from serve_app.domain.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError
from serve_app.domain.routing import COLD_START_S, Route, RoutingTable


def route(pool, vram, cost, deployment=None, **kw):
    return Route(pool=pool, gpu_class=pool, deployment=deployment or f"d@{pool}", vram_gib=vram, cost_s=cost, **kw)


@pytest.fixture
def table(catalog):
    routes = {
        "z-image-turbo": [route("a4500", 20, 13.5, "gen-zit@a4500"), route("a100", 80, 3.8, "gen-zit@a100"),
                          route("rtx4090", 24, 7.3, "gen-zit@rtx4090")],
        "qwen-image-edit-2511": [route("a100", 80, 108, "edit-2511@a100")],
        "qwen-image-edit-2509-svdq-int4-r128-lightning-4step": [
            route("a4500", 20, 10.7, "edit-int4@a4500"), route("a100", 80, 5.6, "edit-int4@a100")],
        "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step": [route("rtx5090", 32, 8.3, "edit-fp4@rtx5090")],
    }
    return RoutingTable(catalog, routes, {"z-image-turbo-svdq-fp4-r32": "fits no GPU pool"})


def test_alias_takes_each_pools_best_variant(table):
    options = table.options(table.resolve("qwen-image-edit", "edit"))
    assert {r.pool: v.id for v, r in options} == {
        "a100": "qwen-image-edit-2511",
        "rtx5090": "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step",
        "a4500": "qwen-image-edit-2509-svdq-int4-r128-lightning-4step",
    }


def test_idle_fleet_prefers_the_fastest_route(table):
    variant, chosen = table.choose(table.options(table.resolve("z-image-turbo", "generate")))
    assert chosen.pool == "a100"  # 3.8 s vs 7.3 s and 13.5 s: not within the slack


def test_smallest_gpu_wins_among_near_equal_routes(table):
    for r in table.routes["z-image-turbo"]:
        r.measured_s = 1.0  # e.g. measured: all pools equally fast
    _, chosen = table.choose(table.options(table.resolve("z-image-turbo", "generate")))
    assert chosen.pool == "a4500"


def test_busy_large_gpu_sends_work_to_smaller_ones(table):
    table.replicas = {"gen-zit@a100": 1, "gen-zit@rtx4090": 1, "gen-zit@a4500": 1}
    table.outstanding["gen-zit@a100"] = 1   # completes in 2 x 3.8 = 7.6 s; costs everyone 7.6^2 / 3.8 = 15.2 s
    _, chosen = table.choose(table.options(table.resolve("z-image-turbo", "generate")))
    assert chosen.pool == "rtx4090"         # 7.3 s


def test_a_replica_free_means_no_wait_however_many_replicas_are_busy(table):
    a100 = table.routes["z-image-turbo"][1]
    table.replicas = {"gen-zit@a100": 4}
    table.outstanding["gen-zit@a100"] = 3
    assert table.expected_completion_s(a100) == pytest.approx(3.8)
    table.outstanding["gen-zit@a100"] = 6   # 3 must finish before one of the 4 replicas is free
    assert table.expected_completion_s(a100) == pytest.approx(3.8 * (1 + 3 / 4))


def test_under_load_an_idle_slow_route_takes_work_before_the_fast_queue_is_as_long(catalog):
    fast, slow = route("rtx4090", 24, 10.0, "fast"), route("a100", 80, 30.0, "slow")
    table = RoutingTable(catalog, {"z-image-turbo": [fast, slow]}, {})
    table.outstanding["fast"] = 1
    # The request itself would finish sooner on the fast route (20 s against 30 s), but it would hold
    # up everything that queues behind it there: 20^2 / 10 = 40 s of delay against 30 s.
    assert table.expected_completion_s(fast) < table.expected_completion_s(slow)
    _, chosen = table.choose(table.options(table.resolve("z-image-turbo", "generate")))
    assert chosen is slow


def test_scaled_to_zero_route_pays_a_cold_start(table):
    table.replicas = {"gen-zit@a100": 0, "gen-zit@rtx4090": 1, "gen-zit@a4500": 1}
    assert table.expected_completion_s(table.routes["z-image-turbo"][1]) == pytest.approx(COLD_START_S + 3.8)
    _, chosen = table.choose(table.options(table.resolve("z-image-turbo", "generate")))
    assert chosen.pool == "rtx4090"


def test_measurements_calibrate_unmeasured_routes(table):
    zit = {r.pool: r for r in table.routes["z-image-turbo"]}
    zit["a100"].observe(0.38)  # measured 10x faster than estimated
    assert table.calibration() == pytest.approx(0.1)
    assert table.seconds_per_image(zit["a4500"], table.calibration()) == pytest.approx(1.35)


def test_ewma_follows_measurements():
    r = route("x", 24, 5.0)
    r.observe(2.0)
    r.observe(4.0)
    assert r.measured_s == pytest.approx(2.6)


def test_out_of_memory_retry_goes_to_a_larger_gpu(table):
    options = table.options(table.resolve("qwen-image-edit-2509-svdq-int4-r128-lightning-4step", "edit"))
    failed = next(r for _, r in options if r.pool == "a4500")
    assert [r.pool for _, r in table.larger_than(options, failed)] == ["a100"]
    assert table.larger_than(options, next(r for _, r in options if r.pool == "a100")) == []


def test_resolution_errors(table):
    with pytest.raises(ModelNotFoundError, match="known models"):
        table.resolve("sdxl", "generate")
    with pytest.raises(InvalidRequestError, match="/v1/images/edits"):
        table.resolve("qwen-image-edit-2511", "generate")
    with pytest.raises(ModelUnavailableError, match="fits no GPU pool"):
        table.resolve("z-image-turbo-svdq-fp4-r32", "generate")


def test_ready_when_every_served_variant_has_a_running_replica_or_may_scale_from_zero(catalog):
    scaled = route("rtx5090", 32, 8.3, "edit-fp4@rtx5090", min_replicas=0)
    table = RoutingTable(catalog, {"z-image-turbo": [route("a4500", 20, 13.5, "gen@a4500"),
                                                     route("a100", 80, 3.8, "gen@a100")],
                                   "qwen-image-edit-2511": [route("a100", 80, 108, "edit@a100")],
                                   "qwen-image-edit-2509-svdq-fp4-r32-lightning-8step": [scaled]}, {})
    assert table.not_ready({"gen@a100": 1, "edit@a100": 1}) == {}
    waiting = table.not_ready({"gen@a4500": 0, "gen@a100": 0, "edit@a100": 2})
    assert list(waiting) == ["z-image-turbo"] and "a4500, a100" in waiting["z-image-turbo"]
