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

    from serve_app.api_keys import cluster_key_id_secret, key_id
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
    # The router's log names the callers by key id, never by key: an HMAC under the cluster's secret (this test
    # runs in the driver of the cluster, so it can read it), not the key's sha256 prefix.
    logs = Path(reliable.tmpdir) / "session_latest" / "logs"
    text = "\n".join(p.read_text(errors="ignore") for p in logs.rglob("*secure*router*") if p.is_file())
    secret = cluster_key_id_secret()
    for key in tenant_keys:
        assert f"key {key_id(key_digest(key), secret)}:" in text and key not in text
        assert f"key {key_digest(key)[:8]}:" not in text


def test_several_authorization_headers_are_refused_through_serves_proxy(http, api_key):
    """Serve's proxy passes every header on; the router refuses the ambiguity rather than using the last one."""
    for headers in ([("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {api_key}")],
                    [("Authorization", f"Bearer {api_key}"), ("Authorization", "Bearer wrong")]):
        refused = http.get("/secure/v1/models", headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "invalid_request" and "2 Authorization headers" in refused.text


def test_metrics_are_closed_to_api_keys(http, api_key):
    """/metrics names every key's use: /secure configures no metrics key, so no key at all opens it."""
    refused = http.get("/secure/metrics", headers={"Authorization": f"Bearer {api_key}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert "key_id" not in refused.text


def test_a_multi_tenant_endpoint_shows_no_load_or_placement_on_probes_and_model_cards(http, api_key):
    assert http.get("/secure/healthz").json() == {"status": "ok"}
    assert http.get("/secure/readyz").json() == {"status": "ready"}
    models = http.get("/secure/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    assert models.status_code == 200
    served = [card["id"] for card in models.json()["data"] if card["served"] and "alias_for" not in card]
    assert served == ["z-image-turbo"]
    for word in ("pools", "replicas", "deployment", "gen-z-image-turbo", "in_flight", "resolves_to"):
        assert word not in models.text, word
    operator_view = http.get("/v1/models").json()["data"]  # the main app shows them
    assert next(card for card in operator_view if card["id"] == "z-image-turbo")["pools"][0]["replicas"] >= 1
    assert "in_flight" in http.get("/healthz").json() and http.get("/readyz").json()["replicas"]


def test_serves_own_route_table_is_not_answered(http):
    """Serve's proxy answers /-/routes itself, before any key check: every application's prefix and name. The
    service's Ray cluster starts its proxies with imageserve's guard (serve_app/proxy_guard.py)."""
    hidden = http.get("/-/routes")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
    assert "secure" not in hidden.text
    assert http.get("/-/healthz").text == "success"  # what KubeRay probes stays


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
