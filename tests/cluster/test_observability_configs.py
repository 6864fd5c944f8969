"""The Grafana dashboard and the scrape config refer only to series imageserve exports."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"
EXPORTED = {
    "ray_imageserve_request_duration_seconds", "ray_imageserve_denoise_step_seconds", "ray_imageserve_requests_total",
    "ray_imageserve_images_total", "ray_imageserve_batch_images", "ray_imageserve_model_load_seconds",
    "ray_imageserve_host_rss_bytes",
    "ray_imageserve_replica_info", "ray_imageserve_vram_planned_peak_bytes", "ray_imageserve_vram_measured_peak_bytes",
    "ray_imageserve_gpu_memory_bytes", "ray_imageserve_router_decisions_total", "ray_imageserve_router_retries_total",
    "ray_imageserve_errors_total", "ray_imageserve_router_queue_depth", "ray_imageserve_pool_replicas",
    "ray_imageserve_key_requests_total", "ray_imageserve_key_cost_total",
    "ray_imageserve_partial_images_total", "ray_imageserve_streams_total", "ray_imageserve_lora_uses_total",
    "ray_imageserve_swaps_total", "ray_imageserve_swap_seconds", "ray_imageserve_swap_bytes_total",
    "ray_imageserve_resident_variant", "ray_imageserve_batch_lines", "ray_imageserve_batch_backlog_age_seconds",
    "ray_imageserve_batch_answers_total", "ray_imageserve_batch_preemptions_total",
}


def test_metric_names_in_the_code_are_the_documented_ones():
    source = (ROOT / "deployments" / "metrics.py").read_text()
    defined = {"ray_" + name for name in re.findall(r'"(imageserve_[a-z_]+)"', source)}
    assert defined == EXPORTED


def test_dashboard_queries_use_exported_series_only():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert any("Latency percentiles" in t for t in titles) and any("headroom" in t for t in titles)
    assert any("queue depth" in t for t in titles) and any("Replicas" in t for t in titles)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_imageserve_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in EXPORTED or name in EXPORTED, name


def test_scrape_config_uses_rays_service_discovery():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_promtool_accepts_the_scrape_config(prometheus_tool):
    import subprocess

    check = subprocess.run([prometheus_tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
