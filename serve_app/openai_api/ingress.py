"""The ingress deployment: the router with the OpenAI images API in front."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from deployments.router import Router
from serve_app.domain.specs import RouterSpec
from serve_app.openai_api.routes import create_api

logger = logging.getLogger(__name__)


@serve.ingress()
class OpenAIIngress(Router):
    """The router deployment with the OpenAI images API in front: HTTP and handle calls both arrive here."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self.spec.http)


def build_ingress(spec: RouterSpec, replicas: dict[str, Application]) -> Application:
    """The application's ingress, bound to its spec and to the model deployments it routes to."""
    return serve.deployment(OpenAIIngress).options(**Router.serve_options(spec)).bind(spec, replicas)
