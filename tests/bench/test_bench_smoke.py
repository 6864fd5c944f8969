"""The benchmarks still run (their figures live in docs/benchmarks.md, not in assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_placement_benchmark_runs_and_reports_the_router_against_both_baselines():
    out = subprocess.run([sys.executable, "-m", "bench.placement", "--requests", "300", "--loads", "0.5",
                          "--json"], capture_output=True, text=True, check=True, timeout=120, cwd=ROOT).stdout
    report = json.loads(out)
    load = report["loads"]["50%"]
    assert load["rate_per_s"] == pytest.approx(0.5 * report["capacity_per_s"], rel=1e-3)
    for policy in ("router", "earliest", "p2c", "jsq"):
        assert load[policy]["p95_s"] >= load[policy]["mean_s"] > 0
    assert set(load["router_over_best_baseline"]) == {"mean", "p95"}


def test_the_time_averaged_costs_report_beside_the_router():
    out = subprocess.run([sys.executable, "-m", "bench.placement", "--requests", "300", "--loads", "0.5",
                          "--averaged", "--json"], capture_output=True, text=True, check=True, timeout=120,
                         cwd=ROOT).stdout
    tried = json.loads(out)["loads"]["50%"]["averaged_over_best_baseline"]
    assert len(tried) == 3 and all(r["mean"] > 0 and r["p95"] > 0 for r in tried.values())


def test_a_time_averaged_load_follows_the_count_over_time(catalog):
    """The averaged count moves toward the instant count with the time constant: e^-1 of the gap left after tau."""
    import math

    from bench.placement import TimeAveragedTable
    from serve_app.domain.routing import Route

    table = TimeAveragedTable(catalog, {"z-image-turbo": [Route(pool="p", gpu_class=None, deployment="d")]}, {})
    table.set_clock(0.0)
    table.outstanding["d"] = 4
    table.set_clock(0.0)
    table.set_clock(table.tau_s)
    assert table.average["d"] == pytest.approx(4 * (1 - math.exp(-1)))


def test_fleet_capacity_is_the_best_split_of_the_workload(catalog):
    from bench.placement import capacity
    from serve_app.domain.routing import Route, RoutingTable

    fast = Route(pool="rtx4090", gpu_class="rtx-4090", deployment="fast", cost_s=10.0)
    slow = Route(pool="a100", gpu_class="a100-80g", deployment="slow", cost_s=30.0)
    table = RoutingTable(catalog, {"z-image-turbo": [fast, slow]}, {})
    # Both GPUs busy all the time: 1/10 + 2/30 images per second (the slow route has two replicas).
    assert capacity(table, {"fast": 1, "slow": 2}, [("generate", "z-image-turbo", 1.0)]) == pytest.approx(1 / 6)


def test_pinned_host_benchmark_compares_per_tensor_pinning_with_flat_buffers():
    out = subprocess.run([sys.executable, "-m", "bench.pinned_host", "--json"], capture_output=True, text=True,
                         check=True, timeout=300, cwd=ROOT).stdout
    rows = {(r["variant"], r["component"]): r for r in json.loads(out)["rows"]}
    transformer = rows[("qwen-image-edit-2511", "transformer")]
    assert transformer["weights_gib"] == pytest.approx(38.05, abs=0.01)  # docs/facts.md: 40.86 GB
    assert transformer["per_tensor_factor"] > 1.5 and transformer["flat_factor"] < 1.001


@pytest.mark.integration
def test_gpu_fullsize_harness_smoke_mode_runs_every_path_on_cpu():
    out = subprocess.run([sys.executable, "-m", "bench.gpu_fullsize", "--smoke", "--parallel", "cp2", "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    report = json.loads(out)
    for variant in ("z-image-turbo", "qwen-image-edit-2509"):  # two ranks over gloo, rank 0 reporting
        ranks = report["variants"][f"{variant}/parallel"]["cp2"]
        assert ranks["total_s"] >= ranks["denoise_s"] > 0 and ranks["speedup_over_one_gpu"] > 0
    assert report["model_size"] == "tiny" and report["device"] == "cpu"
    for key in ("z-image-turbo/none", "qwen-image-edit-2509/none"):
        row = report["variants"][key]
        assert row["transformer_forward_s"] > 0 and row["total_s"] >= row["denoise_s"] > 0
        assert row["planned_allocated_gib"] > 0
        assert row["options"]["sdpa-math"]["speedup"] > 0
        assert row["options"]["sdpa-math"]["masked_calls"]["cfg"] == "ok"
        assert row["masked_calls"]["cfg"] == "ok"
        assert row["cancellation"]["decode_skipped"] is True and "after 1 of" in row["cancellation"]["stopped"]
        assert row["options"]["vae-channels-last"]["compared"] == "vae_decode_s"
        assert row["swap"]["same_image_after"] is True and row["swap"]["bytes_copied"] == 0  # CPU: nothing moves
        service = row["service"]
        assert service["handle_wall_s"] > 0
        assert service["ratio"] == pytest.approx(service["handle_wall_s"] / service["direct_wall_s"], rel=0.02)
    # The fact the config's refusal of mask-less backends for Z-Image rests on, shown on CPU:
    flash = report["variants"]["z-image-turbo/none"]["options"]["sdpa-flash"]["masked_calls"]
    assert flash["cfg"].startswith("ValueError") and flash["batch_2"].startswith("ValueError")


def test_parallel_benchmark_sets_two_ranks_beside_one_process():
    out = subprocess.run([sys.executable, "-m", "bench.parallel", "--size", "128", "--steps", "2", "--images", "1",
                          "--json"], capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    rows = json.loads(out)["rows"]
    assert rows["1 process, 2 threads"]["vs_strongest_baseline"] == 1.0
    ranks = rows["cp2: 2 processes x 1 thread"]
    assert ranks["seconds_per_image"] > 0 and ranks["max_abs_diff_vs_first"] < 1e-4  # the same image


@pytest.mark.integration
def test_throughput_benchmark_compares_batching_settings_over_http():
    out = subprocess.run([sys.executable, "-m", "bench.throughput", "--requests", "6", "--clients", "1,3",
                          "--batching", "1,4@50", "--size", "64", "--steps", "1", "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    report = json.loads(out)
    assert set(report["results"]) == {"1", "4@50"}
    assert report["results"]["1"]["3"]["mean_batch_images"] == 1.0
    # Three clients and a 50 ms wait for company: some pipeline calls held more than one request.
    assert report["results"]["4@50"]["3"]["mean_batch_images"] > 1.0
    assert {"images_per_s_x", "p99_x", "keep"} <= set(report["vs_batching_off"]["4@50"]["1"])


@pytest.mark.integration
def test_autoscale_benchmark_sees_a_new_replica_answer():
    out = subprocess.run([sys.executable, "-m", "bench.autoscale", "--clients", "4", "--steps", "4",
                          "--downscale-delay", "2", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    step = report["from_load_step"]
    assert 0 < step["second_replica_seen_s"] <= step["second_replica_running_s"] <= step["new_replica_answered_s"]
    assert report["from_load_end"]["back_to_one_replica_s"] > 0


def test_a_gpu_run_records_measurements_the_planner_reads(tmp_path, catalog):
    """``--record`` on a lent GPU; here with a report of the shape ``run`` builds (no GPU on this machine)."""
    from argparse import Namespace

    from bench.gpu_fullsize import record_measurements
    from serve_app.domain.calibration import load_measurements

    row = {"input_images": 0, "denoise_s": 0.68, "total_s": 0.95, "peak_process_gib": 23.4}
    report = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "variants": {
        "z-image-turbo/none": row, "z-image-turbo/model": {**row, "peak_process_gib": 13.1},
        "qwen-image-edit-2509/none": {"error": "did not fit"}}}
    path = record_measurements(report, Namespace(size=1024, steps=8), catalog.gpu("h100-sxm"), str(tmp_path))
    assert path.read_text().startswith("# Written by `python -m bench.gpu_fullsize --record`")
    recorded = load_measurements(recorded=tmp_path)
    mine = [m for m in recorded.memory if m.source.startswith("bench/gpu_fullsize.py")]
    assert [(m.mode, m.gib) for m in mine] == [("none", 23.4), ("model", 13.1)]
    (timing,) = [t for t in recorded.timing if t.source.startswith("bench/gpu_fullsize.py")]
    assert timing.seconds_per_step == 0.085 and timing.total_s == 0.95


def test_encoders_benchmark_reports_every_encoder():
    out = subprocess.run([sys.executable, "-m", "bench.encoders", "--size", "128", "--repeats", "1", "--json"],
                         capture_output=True, text=True, check=True, timeout=120, cwd=ROOT).stdout
    rows = json.loads(out)["encoders"]
    assert {"pillow png level 6 (Pillow's default)", "imageserve png, zlib-ng (all bands)",
            "imageserve png, stdlib zlib (all bands)",
            "pillow jpeg q100 (OpenAI's default)"} <= set(rows)
    encoders = {name: row for name, row in rows.items() if not name.startswith("base64")}
    assert all(row["ms"] > 0 and row["bytes"] > 0 for row in encoders.values())
    stdlib, simd = rows["base64 of that PNG, stdlib"], rows["base64 of that PNG, pybase64"]
    assert stdlib["bytes"] == simd["bytes"] > 0 and simd["speedup_over_pillow_default"] is None


@pytest.mark.integration
def test_hot_path_benchmark_compares_pool_and_inline_encoding():
    done = subprocess.run([sys.executable, "-m", "bench.hot_path", "--seconds-per-image", "0.05", "--clients", "1,2",
                           "--formats", "jpeg", "--size", "64", "--rounds", "1", "--hop-requests", "2", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout)["runs"]["0.05"]
    for key in ("pool/jpeg/http/2", "inline/jpeg/handle/1"):
        assert run["results"][key]["images_per_s"] > 0
    assert set(run["pool_vs_inline"]) == {"jpeg/http/1", "jpeg/http/2", "jpeg/handle/1", "jpeg/handle/2"}
    hops = run["hops"]["jpeg"]
    assert hops["bytes"] > 0 and hops["http encode"] > 0 and hops["floor http"] > 0 and hops["floor handle"] > 0
    assert hops["http answer"] >= 0 and hops["http to_router"] >= 0 and hops["handle to_router"] >= 0


def test_preview_benchmark_reports_the_cost_of_previews_against_a_step():
    out = subprocess.run([sys.executable, "-m", "bench.previews", "--repeats", "1", "--json"],
                         capture_output=True, text=True, check=True, timeout=300, cwd=ROOT).stdout
    report = json.loads(out)
    denoising = report["denoising"]
    assert denoising["previews"] == 3 and denoising["plain_s_per_step"] > 0 and denoising["slowdown"] > 0
    assert report["hook_1024"]["decode_over_hook"] > 0 and report["encode_1024"]["png_s"] > 0


def test_load_benchmark_times_every_loader_against_the_disk(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.load", "--smoke", "--dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    report = json.loads(out)
    assert report["size"] == "tiny" and report["bytes"] > 0
    from bench.load import METHODS

    assert set(report["methods"]) == set(METHODS)
    plain = [m for m in METHODS if m.startswith(("disk", "dd"))]
    assert max(report["methods"][m]["of_disk"] for m in plain) == pytest.approx(1.0)
    assert all(row["gb_per_s"] > 0 for row in report["methods"].values())


def test_swap_benchmark_serves_the_same_traffic_three_ways():
    out = subprocess.run([sys.executable, "-m", "bench.swap", "--requests", "12", "--scale", "0.005", "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    report = json.loads(out)
    assert [part["part"] for part in report["parts"]] == ["tiny", "rtx4090"]
    for part in report["parts"]:
        arms = part["arms"]
        assert set(arms) == {"turns", "fifo", "dedicated"}
        assert arms["dedicated"]["swaps_per_100"] == 0 and arms["dedicated"]["gpus"] == 2
        assert all(row["p95_s"] >= row["p50_s"] > 0 for row in arms.values())


def test_step_cache_benchmark_reports_forwards_saved_and_the_pixel_difference():
    out = subprocess.run([sys.executable, "-m", "bench.step_cache", "--steps", "6", "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    rows = {row["setting"]: row for row in json.loads(out)["rows"]}
    assert rows["none"]["full_forwards"] == rows["none"]["plain_forwards"] == 12
    assert rows["none"]["mean_abs_diff"] == 0
    assert all(0 <= row["saved_share"] < 1 and row["mean_abs_diff"] >= 0 for row in rows.values())


def test_fp8_benchmark_reports_the_weight_bytes_and_the_pixel_difference():
    out = subprocess.run([sys.executable, "-m", "bench.fp8", "--steps", "2", "--json"],
                         capture_output=True, text=True, check=True, timeout=600, cwd=ROOT).stdout
    rows = {row["variant"]: row for row in json.loads(out)["rows"]}
    assert set(rows) == {"z-image-turbo-fp8", "qwen-image-edit-2511-fp8"}
    for row in rows.values():
        assert 0 < row["bytes_ratio"] < 0.5  # fp8 weights against the float32 ones of CPU
        assert 0 < row["mean_abs_diff"] <= row["max_abs_diff"]


def test_soak_runs_mixed_traffic_and_finds_no_process_growing_without_bound():
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--duration", "30", "--interval", "2", "--clients", "2",
                          "--json"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    result = json.loads(run.stdout)
    kinds = {outcome.split(":")[0] for outcome in result["outcomes"]}
    assert kinds == {"generate", "generate_lora", "edit", "stream", "bad_input", "cancel"}
    assert "bad_input:422" in result["outcomes"] and "generate:200" in result["outcomes"]
    watched = {row["process"] for row in result["growth"]}
    assert {"gcs", "raylet", "ProxyActor", "ServeController", "ServeReplica:imageserve:router",
            "ServeReplica:imageserve:gen-z-image-turbo", "ray"} <= watched
    assert run.returncode == 0, result["unbounded"]


def test_batch_benchmark_replays_interactive_traffic_without_and_with_a_batch():
    done = subprocess.run([sys.executable, "-m", "bench.batch", "--seconds-per-image", "0.05", "--requests", "12",
                           "--lines", "6", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["batch"]["status"] == "completed" and report["batch"]["completed"] == 6
    for run in ("no_batch", "with_batch", "with_client_script"):
        assert report[run]["p95_ms"] >= report[run]["p50_ms"] > 0
    assert report["p50_ratio"] > 0 and report["with_client_script"]["p95_ratio"] > 0
