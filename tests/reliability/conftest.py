"""A private service configured to be pushed over: small limits, short timeout, fault doubles, API keys."""

from __future__ import annotations

import pytest

from serve_app.runner import free_port

SECRET = "sk-test-7f3c1e0b9a"  # a test key: it must never appear in any log
TENANT_KEYS = ("sk-tenant-a-41d2", "sk-tenant-b-93e7")  # two callers of /secure, for the per-key limits
# Per key on /secure: a burst of 0.3 megapixel-steps, refilled at 0.01 per minute (30 minutes for the burst).
# A 256x256 request at 4 steps costs 0.26, so a key gets one of those; the 64x64 one-step requests of the
# access tests cost 0.004 each.
PER_KEY_LIMITS = {"cost_per_minute": 0.01, "burst_cost": 0.3}


@pytest.fixture(scope="package")
def reliable(tiny_root, tmp_path_factory):
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.engines.gpu_doubles import cuda_fault_loader, out_of_memory_loader
    from serve_app.runner import LocalService

    data = embedded_config_data(tiny_root)
    data["serving"].update({
        "request_timeout_s": 4,
        "limits": {"max_body_mb": 2, "max_input_pixels": 2048 * 2048},
        # A killed router replica's batch lines run again once their lease lapses: 3 s here, not 30.
        "batch": {"lease_s": 3, "poll_interval_s": 0.2, "state_dir": str(tmp_path_factory.mktemp("batch-state"))},
    })
    data["models"]["z-image-turbo"]["deployment"] = {
        "num_replicas": 2, "max_ongoing_requests": 2, "max_queued_requests": 8, "health_check_period_s": 1,
        "graceful_shutdown_timeout_s": 300,  # a replaced replica finishes what it runs, however loaded the machine
    }
    data["models"]["qwen-image-edit-2511"]["deployment"] = {"max_ongoing_requests": 1, "max_queued_requests": 1}
    config = parse_config(data, "reliability")
    service = LocalService(config, port=free_port(), log_to_driver=False)
    # TEST DOUBLES (no GPU here): a CUDA-context fault and a CUDA OOM, each on a trigger prompt.
    service.start(loaders={"z-image-turbo": cuda_fault_loader(), "qwen-image-edit-2509": out_of_memory_loader(0)})
    try:
        secure = embedded_config_data(tiny_root)
        secure["serving"].update({"app_name": "secure", "api_keys": [SECRET, *TENANT_KEYS], "show_internals": False})
        secure["serving"]["limits"].update({"per_key": PER_KEY_LIMITS, "body_read_timeout_s": 1})
        secure["models"] = {"z-image-turbo": secure["models"]["z-image-turbo"]}
        service.add_application(parse_config(secure, "secure"), "/secure")
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="package")
def api_key() -> str:
    return SECRET


@pytest.fixture(scope="package")
def tenant_keys() -> tuple[str, str]:
    return TENANT_KEYS


def encode_image(fmt: str = "PNG", size: tuple[int, int] = (32, 32)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="package")
def encoded():
    """``encoded(fmt, size)`` -> bytes of a small image in that format."""
    return encode_image


@pytest.fixture(scope="package")
def http(reliable):
    import httpx

    with httpx.Client(base_url=reliable.url, timeout=120) as client:
        yield client
