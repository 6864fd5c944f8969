"""Swap groups: the anti-thrash policy, the planner's verdict and prices, the config's rules."""

from __future__ import annotations

import pytest

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.placement import place, place_swap_groups
from serve_app.domain.specs import resolve_application
from serve_app.domain.swapping import Waiting, next_variant, plan_swap_group

Z_INT4 = "z-image-turbo-svdq-int4-r128"
EDIT_INT4 = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"


# ---- the policy ------------------------------------------------------------------------------

@pytest.mark.parametrize(("waiting", "resident", "resident_since", "now", "max_wait_s", "expected"), [
    pytest.param({"a": 9.0, "b": 1.0}, "a", 0.0, 9.999, 10.0, "a",
                 id="the resident keeps the GPU while it has work and no other waited a turn"),
    pytest.param({"a": 9.5, "b": 0.0}, "a", 0.0, 10.0, 10.0, "b",
                 id="one that waited a turn takes it from a resident that held it a turn"),
    pytest.param({"a": 0.0, "b": 19.0}, "b", 19.5, 20.0, 10.0, "b",
                 id="a fresh resident keeps its turn against the starved one it displaced: no ping-pong"),
    pytest.param({"b": 5.0, "c": 3.0}, "a", 4.9, 5.0, 10.0, "c",
                 id="an idle resident gives the GPU to the oldest waiting variant"),
    pytest.param({"a": 2.0, "b": 1.0}, "a", 2.0, 2.0, 0.0, "b", id="a zero turn is first come first served"),
])
def test_which_variant_runs_next(waiting, resident, resident_since, now, max_wait_s, expected):
    queued = [Waiting(variant, oldest_arrival=arrival) for variant, arrival in waiting.items()]
    assert next_variant(queued, {resident}, resident_since, now, max_wait_s) == expected


def test_under_steady_alternating_load_swaps_are_bounded_by_the_turn():
    """Both variants always have work: the policy swaps about once per turn, never once per batch."""
    now, resident, since, swaps = 0.0, {"a"}, 0.0, 0
    arrivals = {"a": 0.0, "b": 0.0}
    for _ in range(1000):  # batches of 0.1 s for 100 s
        chosen = next_variant([Waiting(v, t) for v, t in arrivals.items()], resident, since, now, max_wait_s=5.0)
        if chosen not in resident:
            resident, since, swaps = {chosen}, now, swaps + 1
        now += 0.1
        arrivals[chosen] = now  # its next request arrived while this batch ran
    assert 100 / 5.0 / 2 <= swaps <= 100 / 5.0 + 1


def test_the_policy_needs_work():
    with pytest.raises(ValueError):
        next_variant([], {"a"}, 0.0, 0.0, 1.0)


# ---- the planner ------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", ["rtx-a4500", "rtx-4000-ada", "rtx-4090"])
def test_on_a_20_or_24_gb_card_the_int4_pair_fits_only_by_taking_turns(catalog, gpu):
    verdict = plan_swap_group([catalog.variant(Z_INT4), catalog.variant(EDIT_INT4)], catalog.gpu(gpu), 64)
    assert verdict.fits and not verdict.co_resident
    z, edit = verdict.members
    # Z-Image int4 stays on the GPU (no offload), the edit model streams its components (model offload).
    assert (z.mode, edit.mode) == ("none", "model")
    assert z.gpu_resident_gib == z.host_gib > 0 and edit.gpu_resident_gib == 0
    # The swap in copies Z's weights over PCIe 4.0 x16 at 80%: ~25 GB/s.
    assert verdict.link_gbps == pytest.approx(25.2)
    assert z.swap_in_s == pytest.approx(z.gpu_resident_gib * 2**30 / 25.2e9, abs=0.01)
    assert z.cold_start_s > z.swap_in_s


def test_on_an_80_gb_card_the_pair_stays_on_the_gpu_together(catalog):
    verdict = plan_swap_group([catalog.variant(Z_INT4), catalog.variant(EDIT_INT4)], catalog.gpu("a100-80g"), 64)
    assert verdict.fits and verdict.co_resident


def test_a_group_whose_weights_exceed_host_ram_is_refused_with_the_sums(catalog):
    verdict = plan_swap_group([catalog.variant("z-image-turbo"), catalog.variant("qwen-image-edit-2511")],
                              catalog.gpu("a100-80g"), 64)
    assert not verdict.fits
    assert "host RAM" in verdict.reason and "need 80.8 GiB, the node has 64" in verdict.reason


def test_a_member_that_cannot_run_on_the_gpu_is_refused_with_its_reason(catalog):
    verdict = plan_swap_group([catalog.variant(Z_INT4), catalog.variant("z-image-turbo-svdq-fp4-r32")],
                              catalog.gpu("rtx-4090"), None)
    assert not verdict.fits and "fp4 needs sm_120" in verdict.reason


def test_blackwell_cards_swap_over_pcie_5(catalog):
    verdict = plan_swap_group([catalog.variant(Z_INT4), catalog.variant(EDIT_INT4)], catalog.gpu("rtx-5090"), 128)
    assert verdict.link_gbps == pytest.approx(63 * 0.8, abs=0.1)


# ---- the config -------------------------------------------------------------------------------

def _config(groups, models=(Z_INT4, EDIT_INT4), pools=None):
    data = {"models": {m: {} for m in models}, "swap_groups": groups}
    if pools is not None:
        data["pools"] = pools
    return parse_config(data)


def test_a_group_names_configured_variants_once():
    with pytest.raises(ConfigError, match="not configured"):
        _config([{"name": "g", "variants": [Z_INT4, "qwen-image-edit-2511"]}])
    with pytest.raises(ConfigError, match="is in both"):
        _config([{"name": "g", "variants": [Z_INT4, EDIT_INT4]}, {"name": "h", "variants": [Z_INT4, EDIT_INT4]}])
    with pytest.raises(ConfigError, match="at least 2"):
        _config([{"name": "g", "variants": [Z_INT4]}])


def test_pools_place_a_group_where_it_fits_and_its_variants_nowhere_alone():
    config = _config([{"name": "mixed", "variants": [Z_INT4, EDIT_INT4], "host_ram_gib": 64}],
                     pools=[{"name": "rtx4090", "gpu_class": "rtx-4090"}, {"name": "a4500", "gpu_class": "rtx-a4500"}])
    placements, unplaced = place(config)
    assert placements == [] and unplaced == {}
    groups, unplaced_groups = place_swap_groups(config)
    assert [(g.pool.name, g.plan.co_resident) for g in groups] == [("rtx4090", False), ("a4500", False)]
    spec = resolve_application(config)
    assert [g.name for g in spec.swap_groups] == ["swap-mixed@rtx4090", "swap-mixed@a4500"]
    assert {(r.variant, r.deployment) for r in spec.router.routes} == {
        (v, f"swap-mixed@{p}") for v in (Z_INT4, EDIT_INT4) for p in ("rtx4090", "a4500")}
    assert all(r.shared and r.cost_s for r in spec.router.routes)
    # Members load in the mode the group was planned with.
    members = {m.variant.id: m for m in spec.swap_groups[0].members}
    assert members[EDIT_INT4].pool.offload_mode == "model"


def test_a_group_that_fits_no_pool_leaves_its_variants_unavailable_with_the_reason():
    config = _config([{"name": "mixed", "variants": [Z_INT4, EDIT_INT4], "host_ram_gib": 32}],
                     pools=[{"name": "rtx4090", "gpu_class": "rtx-4090"}])
    with pytest.raises(ConfigError, match="no model to serve"):
        resolve_application(config)
    _, unplaced = place_swap_groups(config)
    assert "host RAM" in unplaced["mixed"]
