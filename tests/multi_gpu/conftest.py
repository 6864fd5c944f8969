"""A private service whose replicas each run in two processes (cp2 over gloo), beside the same models in one
process each (``/one``), so every test compares a two-rank answer with a one-process one."""

from __future__ import annotations

import pytest

from serve_app.runner import free_port

PARALLEL_MODELS = ("z-image-turbo", "qwen-image-edit-2511")
# A silent rank fails its replica after this long. A tiny model's step takes well under a second here, even with
# the machine loaded: the margin is for the machine, the stopped-rank test waits it out once.
COLLECTIVE_TIMEOUT_S = 20


def service_config(tiny_root, parallel: str | None, app_name: str):
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data

    data = embedded_config_data(tiny_root)
    data["serving"]["app_name"] = app_name
    data["models"] = {m: data["models"][m] for m in PARALLEL_MODELS}
    for model in data["models"].values():
        model["parallel"] = parallel
        model["collective_timeout_s"] = COLLECTIVE_TIMEOUT_S
        model["deployment"] = {"health_check_period_s": 1}
    return parse_config(data, f"{app_name} ({parallel or 'one process'})")


@pytest.fixture(scope="package")
def multi_gpu(tiny_root):
    from serve_app.runner import LocalService

    with LocalService(service_config(tiny_root, "cp2", "parallel"), port=free_port(), log_to_driver=False,
                      quiet=True) as service:
        service.add_application(service_config(tiny_root, None, "one"), "/one")
        yield service


@pytest.fixture(scope="package")
def http(multi_gpu):
    import httpx

    with httpx.Client(base_url=multi_gpu.url, timeout=300) as client:
        yield client
