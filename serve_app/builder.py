"""The application builder that ``serve_config.yaml``'s ``import_path`` points at.

``build_app(args)`` validates its ``args`` (an inline config or a config file), resolves the config
once into typed specs (``serve_app.domain.specs``), binds one model deployment per (variant, GPU
pool) to its ``ReplicaSpec`` and one per (swap group, GPU pool) to its ``SwapGroupSpec``, and binds the
ingress over them to the ``RouterSpec``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve import Application

from deployments.model_replica import build_replica
from deployments.swap_replica import build_swap_replica
from serve_app.domain.config import AppConfig, ConfigError, format_validation_error, parse_config
from serve_app.domain.config_files import load_config
from serve_app.domain.specs import resolve_application
from serve_app.engines import EngineLoader
from serve_app.openai_api.ingress import build_ingress

logger = logging.getLogger(__name__)


class BuilderArgs(BaseModel):
    """``args`` of the application in serve_config.yaml: exactly one of ``config`` or ``config_path``."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = Field(default=None, description="The imageserve config, inline.")
    config_path: str | None = Field(default=None, description="Path of an imageserve YAML config on every node.")

    @model_validator(mode="after")
    def _one_source(self) -> BuilderArgs:
        if (self.config is None) == (self.config_path is None):
            raise ValueError("give exactly one of `config` (inline) or `config_path`")
        return self

    def app_config(self) -> AppConfig:
        if self.config_path is not None:
            return load_config(self.config_path)
        return parse_config(self.config, "args.config")


def _cluster_has_gpus() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - no cluster to ask: plan for CPU
        return False


def build_app_from_config(config: AppConfig, loaders: dict[str, EngineLoader] | None = None) -> Application:
    """The application for ``config``; ``loaders`` (variant id -> engine loader) let tests and
    benchmarks give replicas other engines (the GPU test doubles, random full-size weights)."""
    loaders = loaders or {}
    spec = resolve_application(config, cluster_has_gpus=_cluster_has_gpus())
    for variant_id, reason in spec.unplaced.items():
        logger.warning("%s is not served: %s", variant_id, reason)
    replicas = {r.name: build_replica(r, loaders.get(r.variant.id)) for r in spec.replicas}
    for group in spec.swap_groups:
        replicas[group.name] = build_swap_replica(
            group, {v: loaders[v] for v in group.variant_ids if v in loaders} or None)
    return build_ingress(spec.router, replicas)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (``import_path: serve_app.builder:build_app``)."""
    try:
        parsed = BuilderArgs.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "args", BuilderArgs, "application args")) from None
    return build_app_from_config(parsed.app_config())
