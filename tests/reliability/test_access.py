"""API keys on the /secure application; strangers get 401 and the key never reaches a log."""

from concurrent.futures import ThreadPoolExecutor
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


TENANT_BODY = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 4}  # 0.26 megapixel-steps


def test_one_key_flooding_cannot_starve_another(reliable, tenant_keys):
    """/secure lets each key start 0.3 megapixel-steps per 30 minutes: key A floods with eight requests at
    once, gets one through and seven 429s naming its own limit; key B, asking after, is served."""
    import httpx

    from serve_app.api_keys import key_id
    from serve_app.domain.specs import key_digest

    greedy, patient = tenant_keys

    def call(key):
        with httpx.Client(base_url=reliable.url, timeout=120) as client:
            return client.post("/secure/v1/images/generations", json=TENANT_BODY,
                               headers={"Authorization": f"Bearer {key}"})

    with ThreadPoolExecutor(8) as pool:
        flood = list(pool.map(call, [greedy] * 8))
    codes = sorted(r.status_code for r in flood)
    assert codes == [200] + [429] * 7, codes
    for refused in (r for r in flood if r.status_code == 429):
        assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) > 60
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "requests"
    served = call(patient)
    assert served.status_code == 200, served.text
    # The router's log names the callers by key id, never by key.
    logs = Path(reliable.tmpdir) / "session_latest" / "logs"
    text = "\n".join(p.read_text(errors="ignore") for p in logs.rglob("*secure*router*") if p.is_file())
    for key in tenant_keys:
        assert f"key {key_id(key_digest(key))}:" in text and key not in text


def test_a_multi_tenant_endpoint_hides_where_requests_ran(http, api_key):
    answer = http.post("/secure/v1/images/generations", json=BODY, headers={"Authorization": f"Bearer {api_key}"})
    assert answer.status_code == 200
    assert not {"timings", "replica", "pool", "gpu_class"} & set(answer.json())
    operator_view = http.post("/v1/images/generations", json=BODY).json()  # the main app shows them
    assert "queue_s" in operator_view["timings"] and operator_view["replica"]


def test_a_body_that_stops_arriving_is_answered_408_at_the_read_deadline(reliable, api_key):
    """A raw HTTP request whose body never finishes: /secure's 1 s body deadline answers it."""
    import json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(reliable.url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(b"POST /secure/v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + api_key.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
                     b'{"prompt": "a fox", ')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "body_timeout"
