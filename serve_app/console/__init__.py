"""The console: a page at ``/ui`` to try the models and watch the fleet (docs/console.md).

Static HTML, CSS and JavaScript shipped in ``static/``: no build step, nothing fetched from outside, so it works
on an offline cluster. The page calls only the public API, with the key the user gives it (kept in the tab's
``sessionStorage``): ``/v1/models``, ``/v1/images/generations``, ``/v1/images/edits`` and ``/v1/fleet``. The
page and its files are served without a key (they hold only code) under a strict same-origin
Content-Security-Policy: scripts and styles from this origin only, none inline, images from this origin or
the ``data:``/``blob:`` URLs the page makes of the answers, and calls to this origin only.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from serve_app.domain.errors import ResourceNotFoundError

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidated each load: a new release's page never runs an old script
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8"}


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every file the page is made of, read once from the package."""
    folder = resources.files(__package__) / "static"
    return {entry.name: (entry.read_bytes(), MEDIA_TYPES[entry.name[entry.name.rfind("."):]])
            for entry in folder.iterdir() if entry.is_file() and entry.name[entry.name.rfind("."):] in MEDIA_TYPES}


def console_routes() -> APIRouter:
    """``GET /ui`` (the page) and ``GET /ui/assets/<name>`` (its script and style); outside the OpenAPI schema,
    which describes the API, not this page."""
    files = static_files()
    router = APIRouter(include_in_schema=False)

    def answer(name: str) -> Response:
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    @router.get("/ui")
    async def page() -> Response:
        return answer("index.html")

    @router.get("/ui/")
    async def page_with_slash() -> Response:
        # The page's links are relative to /ui (its assets at ui/assets/..., the API at v1/...): one address.
        return RedirectResponse("../ui", status_code=308)

    @router.get("/ui/assets/{name}")
    async def asset(name: str) -> Response:
        if name not in files or name == "index.html":
            raise ResourceNotFoundError(f"no console file {name!r}")
        return answer(name)

    return router
