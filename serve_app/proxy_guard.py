"""A middleware for Ray Serve's own HTTP proxy, which refuses the proxy's ``/-/routes``.

Serve 2.60's proxy answers ``GET /-/routes`` itself, to anyone, before any application sees the request: the
route prefix and name of every application on the cluster (``ray/serve/_private/proxy.py``,
``_get_response_handler_info`` and ``routes_response``; ``is_route_request`` in ``proxy_request_response.py``).
No Serve option turns it off, and imageserve's key check cannot see it. The one hook around the proxy's ASGI app
is ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: in the environment of every node that runs a proxy, it names a
function returning Starlette middlewares that the proxy wraps around everything it serves
(``configure_http_middlewares`` in ``ray/serve/_private/http_util.py``). Set it to ``PROXY_CALLBACK``.

``/-/healthz`` stays: it says only whether the proxy is healthy or draining, and KubeRay probes it.
This module imports nothing heavy: the proxy process loads it.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_app.proxy_guard:proxy_middlewares"
SERVE_ROUTES_PATH = "/-/routes"

_NOT_FOUND = json.dumps({"error": {"code": "not_found", "message": "Not Found", "param": None,
                                   "type": "invalid_request_error"}}).encode()


class HideServeRoutes:
    """Answers ``/-/routes`` 404 with imageserve's JSON error body, as for any unknown path; passes the rest."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        # The proxy's own test of a routes request: the path after the root path (ProxyRequest.route_path).
        route_path = scope.get("path", "")[len(scope.get("root_path", "")):]
        if scope["type"] not in ("http", "websocket") or route_path != SERVE_ROUTES_PATH:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation: no handshake
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_NOT_FOUND)).encode())]})
        await send({"type": "http.response.body", "body": _NOT_FOUND})


def proxy_middlewares() -> list[Middleware]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in each proxy."""
    return [Middleware(HideServeRoutes)]
