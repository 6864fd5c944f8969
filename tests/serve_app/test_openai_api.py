"""The ASGI middlewares alone (no Ray): key check and body limit."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.openai_api import ApiKeyMiddleware, BodyLimitMiddleware


def app_with(middleware, **kwargs):
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.add_middleware(middleware, **kwargs)
    return app


def test_key_middleware_passes_lifespan_and_open_paths():
    with TestClient(app_with(ApiKeyMiddleware, keys=[b"k1", b"k2"])) as client:  # runs lifespan startup
        assert client.get("/healthz").status_code == 200
        assert client.post("/echo", json={}).status_code == 401
        assert client.post("/echo", json={}, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert client.post("/echo", json={}, headers={"Authorization": "bearer k1"}).status_code == 200


def test_body_limit_refuses_declared_and_streamed_bodies():
    with TestClient(app_with(BodyLimitMiddleware, max_bytes=100)) as client:
        assert client.post("/echo", json={"a": "x" * 200}).status_code == 413

        def chunks():
            yield b'{"a": "'
            yield b"x" * 200
            yield b'"}'

        streamed = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/echo", json={"a": "small"}).status_code == 200
