"""ASGI middlewares in front of the routes: the API-key check (before anything reads the body) and the
body limits (size, and how long it may take to arrive)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from serve_app.api_keys import METRICS_KEYS_ENV, RELOAD_S, KeyRing
from serve_app.openai_api.errors import error_response

logger = logging.getLogger(__name__)


OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no key
# The console's page and its static files: the page must load to ask for a key; they hold nothing but code
# (serve_app/console/static), and every call the page makes carries the key it was given.
OPEN_PREFIXES = ("/ui",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)


METRICS_PATH = "/metrics"  # every key's series: opened by a metrics key, never by an API key


def key_id_of(request: Request) -> str | None:
    """The caller's key id, as ApiKeyMiddleware found it (None on an endpoint without keys)."""
    return request.scope.get("state", {}).get("key_id")


class ApiKeyMiddleware:
    """Bearer-key check on every route but the probes (/healthz, /readyz) and the console's static page (/ui),
    against ``keys``'s digests (serve_app/api_keys.py). The caller's key id goes into the ASGI scope as
    ``state["key_id"]``.

    ``/metrics`` shows every key's series, so it takes ``metrics_keys`` only: an API key gets 403. With no
    metrics key configured it is open only where no API key is configured either (a local run).
    Several ``Authorization`` headers are a 400: a proxy in front may have checked another one than this."""

    def __init__(self, app, keys: KeyRing, metrics_keys: KeyRing | None = None) -> None:
        self.app = app
        self.keys = keys
        self.metrics_keys = metrics_keys or KeyRing(warn_if_open=False, environ={})

    @staticmethod
    def _token(header: bytes | None) -> bytes | None:
        if not header:
            return None
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        return token.strip()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        if is_open(path):
            return await self.app(scope, receive, send)
        ring = self.metrics_keys if path == METRICS_PATH else self.keys
        if not ring.configured and not (path == METRICS_PATH and self.keys.configured):
            return await self.app(scope, receive, send)  # open: no key of this kind is configured
        # ASGI servers lower-case header names; every Authorization header counts, not the last one alone.
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(headers) > 1:
            response = error_response(400, "invalid_request", f"{len(headers)} Authorization headers: send exactly "
                                      "one, `Authorization: Bearer <key>`")
            return await response(scope, receive, send)
        if ring.unavailable():
            # Fail closed, and say it is the server's fault: the client's key may be fine, and a 5xx pages someone.
            response = error_response(503, "keys_unavailable", "the service cannot check API keys right now; retry "
                                      "shortly", headers={"Retry-After": str(int(RELOAD_S))})
            return await response(scope, receive, send)
        token = self._token(headers[0] if headers else None)
        key_id = ring.check(token) if token is not None else None
        if key_id is not None:
            scope.setdefault("state", {})["key_id"] = key_id
            return await self.app(scope, receive, send)
        if path == METRICS_PATH and token is not None and self.keys.check(token) is not None:
            response = error_response(403, "permission_denied", "/metrics shows every key's use: it takes a metrics "
                                      f"key (serving.metrics_key_sha256 or {METRICS_KEYS_ENV}), not an API key")
            return await response(scope, receive, send)
        which = "a metrics key" if path == METRICS_PATH else "a valid API key"
        response = error_response(401, "unauthorized", f"{which} is required: Authorization: Bearer <key>",
                                  headers={"WWW-Authenticate": 'Bearer realm="imageserve"'})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Bounds what a request body may cost before the app parses it.

    - Size: 413 at once from Content-Length, or as soon as a streamed body passes the limit.
      ``route_limits`` sets a smaller limit per path (the JSON generation route takes kilobytes, not the
      megabytes an edit's images need).
    - Time: 408 when the body has not fully arrived ``read_timeout_s`` after the request began, so a
      client that trickles a body (or stops sending one) does not hold a router slot; 503 when not one byte of
      it arrived (``_too_slow``: what a request re-sent by Serve after its first router replica died looks like).
    In both cases the app then sees the client leave and stops reading.
    """

    def __init__(self, app, max_bytes: int, route_limits: dict[str, int] | None = None,
                 read_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}
        self.read_timeout_s = read_timeout_s

    @staticmethod
    def _too_large(limit: int) -> JSONResponse:
        size = f"{limit / 1e6:g} MB" if limit >= 1e6 else f"{limit / 1e3:g} KB"
        return error_response(413, "request_too_large", f"request body over the {size} limit of this route")

    def _too_slow(self, received: int) -> JSONResponse:
        if received == 0:
            # Not one byte of the body reached this router replica. Serve's proxy hands a request's body to one
            # replica: the first that takes it drains the proxy's queue of the client's messages (Ray 2.60
            # serve/_private/proxy.py, receive_asgi_messages). When that replica dies before Serve's router hears
            # it accepted the request, the router re-sends the request to another (serve/_private/router.py,
            # _route_and_send_request_once retries on ActorDiedError), whose body never comes: a 408 would blame
            # a client that sent everything. Without a byte nobody can tell that from a client that sent none,
            # so the answer is the server's: 503 with Retry-After.
            return error_response(
                503, "body_lost", f"no byte of the request body reached the server within {self.read_timeout_s:g} s:"
                " it was lost when the router replica that first took the request failed (Serve re-sends such a "
                "request without its body), or none was sent; send the request again",
                headers={"Retry-After": "1"})
        return error_response(408, "body_timeout", f"the request body did not arrive within {self.read_timeout_s:g} s")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        limit = self.route_limits.get(path, self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(limit)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout_s is None else loop.time() + self.read_timeout_s
        seen = 0
        state = {"started": False, "refused": False, "body_done": False}

        async def refuse(response: JSONResponse) -> dict:
            state["refused"] = True
            if not state["started"]:
                await response(scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            nonlocal seen
            if state["refused"] or state["body_done"] or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    return await refuse(self._too_slow(seen))
            if message["type"] == "http.request" and not state["refused"]:
                seen += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if seen > limit:
                    return await refuse(self._too_large(limit))
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            if not state["refused"]:
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)
