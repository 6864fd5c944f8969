"""The parallel modes the planner prices, what placement picks, and what a config may ask for."""

from __future__ import annotations

import pytest

from serve_app.domain.config import ConfigError, parse_config
from serve_app.domain.parallelism import (
    ParallelMode,
    choose_parallel,
    estimate_parallel_seconds,
    exchanged_bytes_per_forward,
    parallel_problem,
    plan_parallel,
    plan_parallel_mode,
)
from serve_app.domain.planner import estimate_seconds, plan

EDIT = "qwen-image-edit-2511"


def test_modes_parse_and_print_as_configs_write_them():
    assert ParallelMode.parse("tp4") == ParallelMode("tp", 4) and str(ParallelMode("cp", 8)) == "cp8"
    for bad in ("tp3", "cp1", "pp2", "tp16"):
        with pytest.raises(ValueError, match="cp or tp followed by 2, 4 or 8"):
            ParallelMode.parse(bad)


def test_tensor_parallel_shards_two_thirds_of_the_edit_transformer_and_keeps_the_modulation_whole(catalog):
    """diffusers' _tp_plan shards 66.53% of the 20.43 B parameters (counted on the meta device); the AdaLN
    modulation stays on every rank, so two 24 GB cards cannot hold bf16 2511 and four can."""
    variant, gpu = catalog.variant(EDIT), catalog.gpu("rtx-4090")
    two, four = (plan_parallel_mode(variant, gpu, ParallelMode("tp", n), 1024, 1024) for n in (2, 4))
    share = next(p for p in four.parts if p.name == "transformer share")
    assert share.gib == pytest.approx(38.05 * (0.3347 + 0.6653 / 4), abs=0.01)
    assert not two.fits and "28.0 GiB per GPU" in two.reason
    assert four.fits and four.offload_mode == "model" and four.peak_vram_gib <= four.usable_vram_gib
    assert sum(p.gib for p in four.parts) == pytest.approx(four.peak_vram_gib, abs=0.01)


def test_context_parallel_holds_all_the_weights_and_a_share_of_the_sequence(catalog):
    variant, gpu = catalog.variant(EDIT), catalog.gpu("h100-sxm")
    one = plan(variant, gpu, 1024, 1024)
    cp2 = plan_parallel_mode(variant, gpu, ParallelMode("cp", 2), 1024, 1024)
    assert cp2.fits and cp2.offload_mode == "none"
    assert cp2.peak_vram_gib == pytest.approx(one.peak_vram_gib, abs=1.0)  # weights dominate; buffers added


def test_seconds_are_the_one_gpu_denoising_over_n_plus_the_exchange_over_the_peer_link(catalog):
    variant = catalog.variant(EDIT)
    h100, rtx4090 = catalog.gpu("h100-sxm"), catalog.gpu("rtx-4090")
    one = estimate_seconds(variant, h100, "none", 1024, 1024)
    cp8 = estimate_parallel_seconds(variant, h100, ParallelMode("cp", 8), "none", 1024, 1024)
    assert cp8.denoise_s == pytest.approx(one.denoise_s / 8, abs=0.01)
    assert cp8.total_s == pytest.approx(cp8.denoise_s + cp8.communication_s + cp8.other_s, abs=0.01)
    # The 40-step 2511 edit in context parallel on H100s, against SGLang's 23.0 s on one (docs/facts.md).
    assert estimate_parallel_seconds(variant, h100, ParallelMode("cp", 2), "none", 1024, 1024).total_s <= 23.0
    # Ulysses sends 4 x (tokens/N) x hidden x 2 bytes x (N-1)/N per block; 8448 tokens, 3072 wide, 60 blocks.
    assert exchanged_bytes_per_forward(variant, ParallelMode("cp", 2), 8448) == 60 * 4 * 4224 * 3072 * 2 * 0.5
    # GeForce cards stage through host memory: half the PCIe rate, times the link efficiency.
    tp4 = estimate_parallel_seconds(variant, rtx4090, ParallelMode("tp", 4), "model", 1024, 1024)
    assert tp4.link_gbps == pytest.approx(31.5 * 0.8 / 2) and "via-host" in tp4.link
    assert tp4.offload_s > 0


def test_one_gpu_wins_where_it_fits_without_streaming(catalog):
    variant, h100 = catalog.variant(EDIT), catalog.gpu("h100-sxm")
    assert choose_parallel(plan(variant, h100, 1024, 1024), plan_parallel(variant, h100, 8, 1024, 1024)) is None
    rtx4090 = catalog.gpu("rtx-4090")
    streaming = plan(variant, rtx4090, 1024, 1024)
    assert streaming.mode == "sequential"
    chosen = choose_parallel(streaming, plan_parallel(variant, rtx4090, 4, 1024, 1024))
    assert chosen is not None and chosen.mode == "tp4" and chosen.seconds_per_image < streaming.seconds_per_image
    assert choose_parallel(streaming, plan_parallel(variant, rtx4090, 2, 1024, 1024)) is None  # nothing fits


@pytest.mark.parametrize(("variant_id", "mode", "why"), [
    ("z-image-turbo", "tp2", "no tensor-parallel plan"),
    ("qwen-image-2.1", "cp2", "no context-parallel plan"),
    ("qwen-image-edit-2511-fp8", "cp2", "fp8"),
    ("z-image-turbo-svdq-int4-r128", "cp2", "nunchaku"),
])
def test_variants_without_a_plan_for_a_mode_are_refused_with_the_reason(catalog, variant_id, mode, why):
    assert why in parallel_problem(catalog.variant(variant_id), ParallelMode.parse(mode))


def test_placement_spans_a_replica_over_a_node_only_where_one_gpu_would_stream(catalog):
    from serve_app.domain.config import parse_fleet
    from serve_app.domain.placement import capacity_warnings, place

    fleet = parse_fleet({"pools": [
        {"name": "rtx4090", "gpu_class": "rtx-4090", "gpus_per_node": 4, "max_nodes": 2},
        {"name": "rtx5090", "gpu_class": "rtx-5090", "gpus_per_node": 4, "max_nodes": 1},
        {"name": "single", "gpu_class": "rtx-4090", "gpus_per_node": 4, "multi_gpu_replicas": False}]})
    config = fleet.serve_with(parse_config({"models": {EDIT: {}, "z-image-turbo": {}}}))
    placements, unplaced = place(config)
    modes = {(p.variant.id, p.pool.name): (p.parallel.mode if p.parallel else None) for p in placements}
    assert modes == {("qwen-image-edit-2511", "rtx4090"): "tp4", ("qwen-image-edit-2511", "rtx5090"): "tp2",
                     ("z-image-turbo", "rtx4090"): None, ("z-image-turbo", "rtx5090"): None,
                     ("z-image-turbo", "single"): None}
    tp4 = next(p for p in placements if p.pool.name == "rtx4090" and p.parallel)
    assert tp4.seconds_per_image == tp4.parallel.seconds_per_image and tp4.gpus_per_replica == 4
    # A replica takes its GPUs from the pool: 4 + 1 on a pool of 8.
    assert not [w for w in capacity_warnings(config, fleet, placements) if "rtx4090" in w]


def test_a_forced_mode_is_placed_where_it_fits_and_becomes_the_replicas_spec(catalog):
    from serve_app.domain.specs import resolve_application

    pools = [{"name": "h100", "gpu_class": "h100-sxm", "gpus_per_node": 8}]
    config = parse_config({"pools": pools, "models": {EDIT: {"parallel": "cp4"}}})
    (replica,) = resolve_application(config).replicas
    assert replica.engine.parallel == "cp4" and replica.engine.ranks == 4
    (route,) = resolve_application(config).router.routes
    assert route.parallel == "cp4" and route.cost_s == pytest.approx(
        plan_parallel_mode(catalog.variant(EDIT), catalog.gpu("h100-sxm"), ParallelMode("cp", 4), 1024,
                           1024).seconds_per_image)


def test_a_multi_gpu_replica_asks_serve_for_one_bundle_per_rank_on_one_node():
    from deployments.model_replica import ModelReplica
    from serve_app.domain.specs import resolve_application

    pools = [{"name": "h100", "gpu_class": "h100-sxm", "gpus_per_node": 8}]
    config = parse_config({"pools": pools, "models": {EDIT: {"parallel": "cp2"}}})
    (replica,) = resolve_application(config).replicas
    options = ModelReplica.serve_options(replica)
    bundle = {"CPU": 1.0, "GPU": 1.0, "gpu_class:h100-sxm": 0.01}
    assert options["placement_group_bundles"] == [bundle, bundle]
    assert options["placement_group_strategy"] == "STRICT_PACK"


@pytest.mark.parametrize(("models", "pools", "device", "message"), [
    ({"z-image-turbo": {"parallel": "tp2"}}, None, "auto", "no tensor-parallel plan"),
    ({EDIT: {"parallel": "tp2"}}, None, "cpu", "shards tensors only on cuda"),
    ({EDIT: {"parallel": "cp8"}}, [{"name": "p", "gpu_class": "rtx-4090", "gpus_per_node": 4}], "auto",
     "no pool that may host it has 8 GPUs per node"),
    ({EDIT: {"parallel": "cp2", "offload_mode": "sequential"}}, None, "auto", "parallel=context with "
                                                                               "offload=sequential"),
    ({EDIT: {"parallel": "cp2", "optimizations": {"step_cache": {"kind": "first_block"}}}}, None, "auto",
     "ranks would skip different steps"),
    ({EDIT: {"parallel": "cp2", "optimizations": {"attention_backend": "_native_math"}}}, None, "auto",
     "'_native_math' has no context-parallel path"),
])
def test_a_config_asking_for_a_mode_that_cannot_run_is_refused_at_load(models, pools, device, message):
    data = {"device": {"device": device}, "models": models, **({"pools": pools} if pools else {})}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_plan_gpus_prints_every_mode_and_placements_pick(capsys):
    from serve_app.cli import main

    assert main(["plan", "--gpu", "rtx-4090", "--gpus", "4", "--variant", EDIT]) == 0
    out = capsys.readouterr().out
    assert "one GPU: sequential offload" in out and "placement: tp4 (model offload)" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  cp") or line.startswith("  tp")] == \
        ["cp2", "tp2", "cp4", "tp4"]
