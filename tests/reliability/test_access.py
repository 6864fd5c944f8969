"""API keys on the /secure application; strangers get 401 and the key never reaches a log."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BODY = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1}


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Basic {key}"}, {"Authorization": "{key}"},
])
def test_every_route_but_the_probes_needs_a_valid_bearer_key(http, headers, api_key):
    headers = {k: v.format(key=api_key) for k, v in headers.items()}
    for method, path in (("post", "/secure/v1/images/generations"), ("get", "/secure/v1/models"),
                         ("get", "/secure/metrics"), ("get", "/secure/openapi.json")):
        response = getattr(http, method)(path, headers=headers, **({"json": BODY} if method == "post" else {}))
        assert response.status_code == 401, (path, headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthorized"


def test_a_valid_key_works_and_the_probes_are_open(http, api_key):
    ok = http.post("/secure/v1/images/generations", json=BODY, headers={"Authorization": f"Bearer {api_key}"})
    assert ok.status_code == 200
    assert http.get("/secure/healthz").status_code == 200
    assert http.get("/secure/readyz").status_code == 200  # a load balancer's probe carries no key


def test_requests_choose_only_catalog_variants(http):
    for model in ("../../etc/passwd", "/models/z-image", "Tongyi-MAI/Z-Image-Turbo", "hf-internal-testing/x"):
        response = http.post("/v1/images/generations", json={**BODY, "model": model})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_the_key_never_appears_in_any_log(reliable, http, api_key):
    http.post("/secure/v1/images/generations", json=BODY, headers={"Authorization": f"Bearer {api_key}"})
    http.post("/secure/v1/images/generations", json=BODY, headers={"Authorization": f"Bearer {api_key}x"})
    logs = Path(reliable.tmpdir) / "session_latest" / "logs"
    assert logs.is_dir()
    for path in logs.rglob("*"):
        if path.is_file():
            assert api_key not in path.read_text(errors="ignore"), path
