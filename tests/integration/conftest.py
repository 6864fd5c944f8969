"""One private local Ray cluster with the embedded default deployed, shared by this package's tests."""

from __future__ import annotations

import pytest

from serve_app.runner import free_port


@pytest.fixture(scope="package")
def service(tiny_root, tmp_path_factory):
    from serve_app.embedded import embedded_config
    from serve_app.runner import LocalService

    # Batches poll fast so the batch tests wait less; the store is this package's own.
    config = embedded_config(tiny_root, batch={"state_dir": str(tmp_path_factory.mktemp("batch-state")),
                                               "poll_interval_s": 0.2})
    # Export metrics every second (Ray's default is 10 s) so the Prometheus test waits less.
    with LocalService(config, port=free_port(), metrics_report_interval_ms=1000) as running:
        yield running


@pytest.fixture(scope="package")
def http(service):
    import httpx

    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="package")
def openai_client(service):
    """The official openai client against the service (no retries: every answer is the first one)."""
    from openai import OpenAI

    return OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="package")
def png_file():
    """``png_file(color)``: a 64x64 PNG as the file object openai-python uploads."""
    import io

    from PIL import Image

    def make(color):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
        buffer.seek(0)
        buffer.name = "input.png"
        return buffer

    return make
