"""One private local Ray cluster with the embedded default deployed, shared by this package's tests."""

from __future__ import annotations

import pytest

from serve_app.runner import free_port


@pytest.fixture(scope="package")
def service(tiny_root):
    from serve_app.embedded import embedded_config
    from serve_app.runner import LocalService

    config = embedded_config(tiny_root)
    # Export metrics every second (Ray's default is 10 s) so the Prometheus test waits less.
    with LocalService(config, port=free_port(), metrics_report_interval_ms=1000) as running:
        yield running


@pytest.fixture(scope="package")
def http(service):
    import httpx

    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client
