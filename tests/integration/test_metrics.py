"""A real Prometheus scrapes the running service; its query API sees exact counts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve_app.embedded import EMBEDDED_VARIANTS
from serve_app.runner import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def metrics_port(service):
    import ray

    return ray.nodes()[0]["MetricsExportPort"]


@pytest.fixture(scope="module")
def prometheus(metrics_port, tmp_path_factory, prometheus_tool):
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [prometheus_tool("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, (folder / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus_url: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(prometheus_url: str, expr: str) -> float | None:
    result = query(prometheus_url, expr)
    return float(result[0]["value"][1]) if result else None


def exported_total(metrics_port: int, sample: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def settled_total(metrics_port: int, sample: str, **labels) -> float:
    """The exported value once earlier requests have all been exported (two equal reads 2.5 s apart)."""
    previous = None
    for _ in range(20):
        current = exported_total(metrics_port, sample, **labels)
        if current == previous:
            return current
        previous = current
        time.sleep(2.5)
    return current


def wait_for(prometheus_url: str, expr: str, expected: float, timeout_s: float = 60) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = scalar(prometheus_url, expr)
        if value == expected:
            return value
        time.sleep(1)
    return value


def test_prometheus_sees_exact_request_and_histogram_counts(http, prometheus, metrics_port):
    labels = {"variant": "z-image-turbo", "status": "ok"}
    before = settled_total(metrics_port, "ray_imageserve_requests_total", **labels)
    hist_before = settled_total(metrics_port, "ray_imageserve_request_duration_seconds_count",
                                variant="z-image-turbo", stage="total")
    errors_before = settled_total(metrics_port, "ray_imageserve_errors_total", reason="bad_input", task="generate")
    n = 5
    for i in range(n):
        response = http.post("/v1/images/generations",
                             json={"prompt": "count me", "size": "64x64", "num_inference_steps": 2, "seed": i})
        assert response.status_code == 200
    assert http.post("/v1/images/generations", json={"prompt": "x", "size": "63x64"}).status_code == 422

    requests = wait_for(prometheus, 'sum(ray_imageserve_requests_total{variant="z-image-turbo",status="ok"})',
                        before + n)
    assert requests == before + n
    histogram = wait_for(prometheus, 'sum(ray_imageserve_request_duration_seconds_count'
                                     '{variant="z-image-turbo",stage="total"})', hist_before + n)
    assert histogram == hist_before + n
    errors = wait_for(prometheus, 'sum(ray_imageserve_errors_total{reason="bad_input",task="generate"})',
                      errors_before + 1)
    assert errors == errors_before + 1
    stages = {r["metric"]["stage"] for r in query(
        prometheus, 'ray_imageserve_request_duration_seconds_count{variant="z-image-turbo"}')}
    assert {"queue", "text_encode", "denoise", "vae_decode", "total"} <= stages
    decisions = scalar(prometheus, 'sum(ray_imageserve_router_decisions_total{variant="z-image-turbo"})')
    assert decisions is not None and decisions >= n


def seen(prometheus_url: str, metric: str) -> list[dict]:
    """Every series of ``metric`` Prometheus scraped in the last 5 minutes, with its latest value.

    Not an instant query: Ray's agent drops a gauge whose replica has not re-exported it within two
    report intervals, which a loaded two-core machine can delay; Prometheus then marks the series
    stale until the next export, and an instant query at that moment would not see it.
    """
    return query(prometheus_url, f"last_over_time({metric}[5m])")


def test_memory_series_have_the_right_labels_and_no_invented_gpu_numbers(prometheus):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not seen(prometheus, "ray_imageserve_host_rss_bytes"):
        time.sleep(1)
    rss = seen(prometheus, "ray_imageserve_host_rss_bytes")
    assert {r["metric"]["variant"] for r in rss} == set(EMBEDDED_VARIANTS)
    for series in rss:
        assert {"task", "variant", "gpu_class", "pool"} <= set(series["metric"])
        assert float(series["value"][1]) > 100e6
    # Ray adds the `replica` tag itself; under full-suite load one series was seen without it
    # (open question, issue 7's note), so it is required per variant, not on every series.
    assert {r["metric"]["variant"] for r in rss if "replica" in r["metric"]} == set(EMBEDDED_VARIANTS)
    info = seen(prometheus, "ray_imageserve_replica_info")
    assert {r["metric"]["device"] for r in info} == {"cpu"}
    assert seen(prometheus, "ray_imageserve_gpu_memory_bytes") == []  # no CUDA here: absent, not zero
    assert seen(prometheus, "ray_imageserve_vram_measured_peak_bytes") == []
    planned = seen(prometheus, 'ray_imageserve_vram_planned_peak_bytes{variant="z-image-turbo"}')
    assert planned and all(r["metric"]["shape"].endswith("img") for r in planned)
    assert seen(prometheus, "ray_imageserve_model_load_seconds")
    for forbidden in ("prompt", "seed", "request_id"):
        assert not any(forbidden in r["metric"] for r in rss + info + planned)


def test_metrics_endpoint_passes_promtool(http, prometheus_tool):
    response = http.get("/metrics")
    assert response.status_code == 200
    assert "ray_imageserve_requests_total" in response.text
    check = subprocess.run([prometheus_tool("promtool"), "check", "metrics"], input=response.text, capture_output=True,
                           text=True, timeout=60)
    report = check.stdout + check.stderr
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", report
