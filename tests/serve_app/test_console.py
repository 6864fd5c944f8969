"""The console's files as the ingress serves them, without Ray: headers, no inline code, nothing from outside,
and open under API keys while the API behind them is not. tests/integration/test_console.py drives the page in
a real browser."""

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from serve_app.console import CONTENT_SECURITY_POLICY, static_files
from serve_app.domain.specs import HttpSpec, key_digest
from serve_app.openai_api.routes import create_api


class NoService:
    """Nothing behind the routes: these tests reach only what the app answers on its own."""

    def record_error(self, task: str, reason: str) -> None:
        pass


@pytest.fixture(scope="module")
def client():
    with TestClient(create_api(NoService())) as client:
        yield client


def test_the_page_and_its_files_carry_a_strict_same_origin_policy(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/ui/assets/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/assets/console.css").headers["content-type"].startswith("text/css")


def test_unknown_files_are_a_json_404_and_the_slash_leads_to_the_page(client):
    for name in ("nope.js", "index.html", "..%2Fconsole.js"):
        missing = client.get(f"/ui/assets/{name}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", name
    slash = client.get("/ui/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "../ui"


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


def test_the_page_has_no_inline_code_and_names_only_its_own_files():
    files = static_files()
    parser = Elements()
    parser.feed(files["index.html"][0].decode())
    assert parser.script_text.strip() == ""
    for tag, attrs in parser.tags:
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "style":
            pytest.fail("an inline <style> element")
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is None or value.startswith("#") or value == "data:,":
                continue
            assert value.startswith("ui/assets/") and value.removeprefix("ui/assets/") in files, (tag, value)


def test_the_script_and_style_fetch_nothing_from_outside():
    files = static_files()
    script = files["console.js"][0].decode()
    style = files["console.css"][0].decode()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", script + style)
    assert "@import" not in style and "url(" not in style
    assert "eval(" not in script and "new Function" not in script and "innerHTML" not in script
    # The key is kept in the tab's sessionStorage only, and never logged.
    assert "localStorage" not in script and "console.log" not in script


def test_under_api_keys_the_page_is_open_and_the_api_behind_it_is_not(monkeypatch):
    monkeypatch.delenv("IMAGESERVE_API_KEYS", raising=False)
    http = HttpSpec(api_key_sha256=(key_digest("sk-console"),))
    with TestClient(create_api(NoService(), http)) as client:
        assert client.get("/ui").status_code == 200
        assert client.get("/ui/assets/console.js").status_code == 200
        for path in ("/v1/fleet", "/v1/models", "/uix", "/ui-not"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", path
