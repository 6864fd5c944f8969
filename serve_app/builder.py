"""The application builder that ``serve_config.yaml``'s ``import_path`` points at.

``build_app(args)`` validates its ``args`` (an inline config or a config file), creates one
deployment per served variant with that variant's Ray options, and binds the router over them.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve import Application

from serve_app.config import AppConfig, ConfigError, DeploymentOptions, format_validation_error, load_config, parse_config

logger = logging.getLogger(__name__)


class BuilderArgs(BaseModel):
    """``args`` of the application in serve_config.yaml: exactly one of ``config`` or ``config_path``."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = Field(default=None, description="The imageserve config, inline.")
    config_path: str | None = Field(default=None, description="Path of an imageserve YAML config on every node.")

    @model_validator(mode="after")
    def _one_source(self) -> "BuilderArgs":
        if (self.config is None) == (self.config_path is None):
            raise ValueError("give exactly one of `config` (inline) or `config_path`")
        return self

    def app_config(self) -> AppConfig:
        if self.config_path is not None:
            return load_config(self.config_path)
        return parse_config(self.config, "args.config")


def deployment_name(task: str, variant_id: str, pool: str | None = None) -> str:
    base = f"{'gen' if task == 'generate' else 'edit'}-{variant_id}"
    return f"{base}@{pool}" if pool else base


def _cluster_has_gpus() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001
        return False


def serve_options(options: DeploymentOptions, config: AppConfig, pool_actor_options: dict | None = None) -> dict[str, Any]:
    """Ray Serve ``.options(...)`` for a model deployment (on a GPU pool when ``pool_actor_options``)."""
    if options.num_gpus is not None:
        num_gpus = options.num_gpus
    elif pool_actor_options is not None or config.device.device == "cuda" or (
        config.device.device == "auto" and _cluster_has_gpus()
    ):
        num_gpus = 1.0
    else:
        num_gpus = 0.0
    actor: dict[str, Any] = {
        "num_gpus": num_gpus,
        "num_cpus": options.num_cpus if options.num_cpus is not None else (1.0 if num_gpus else 0.0),
    }
    for key, value in (pool_actor_options or {}).items():
        actor[key] = dict(value) if isinstance(value, dict) else value
    if options.resources:
        actor["resources"] = {**actor.get("resources", {}), **options.resources}
    if options.accelerator_type:
        actor["accelerator_type"] = options.accelerator_type
    if options.label_selector:
        actor["label_selector"] = dict(options.label_selector)
    result: dict[str, Any] = {"ray_actor_options": actor}
    for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                "graceful_shutdown_timeout_s"):
        value = getattr(options, key)
        if value is not None:
            result[key] = value
    if options.autoscaling is not None:
        result["autoscaling_config"] = options.autoscaling.model_dump(exclude_none=True)
    else:
        result["num_replicas"] = options.num_replicas or 1
    return result


def build_app_from_config(config: AppConfig, loaders: dict[str, Any] | None = None) -> Application:
    """The application for ``config``; ``loaders`` (variant id -> loader) lets tests inject pipelines."""
    from deployments.editing import EditServer
    from deployments.generation import GenerationServer
    from deployments.router import Router
    from serve_app.fleet import capacity_warnings, place, pool_requirements

    catalog = config.build_catalog()
    config_data = config.model_dump(mode="json")
    loaders = loaders or {}
    routes: dict[str, list[dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}

    def bind(variant, pool_name, gpu, extra_actor_options, options, seconds, mode):
        server = GenerationServer if variant.task == "generate" else EditServer
        name = deployment_name(variant.task, variant.id, pool_name)
        pool = None if pool_name is None else {"name": pool_name, "gpu_class": gpu.id, "mode": mode}
        bound = server.options(name=name, **serve_options(options, config, extra_actor_options)).bind(
            variant.id, config_data, loaders.get(variant.id), pool
        )
        min_replicas = options.autoscaling.min_replicas if options.autoscaling else (options.num_replicas or 1)
        routes.setdefault(variant.id, []).append({
            "pool": pool_name or "default", "gpu_class": gpu.id if gpu else None,
            "vram_gib": gpu.vram_gib if gpu else None, "deployment": name, "handle": bound,
            "cost_s": seconds, "min_replicas": min_replicas,
        })

    if config.pools:
        placements, unavailable = place(config, catalog)
        for unplaced, reason in unavailable.items():
            logger.warning("%s is not served: %s", unplaced, reason)
        for warning in capacity_warnings(config, placements):
            logger.warning(warning)
        for p in placements:
            bind(p.variant, p.pool.name, p.gpu, pool_requirements(p.pool, p.gpu),
                 config.deployment_options(p.variant.id, p.pool), p.seconds_per_image, p.plan.mode)
    else:
        for model_id in config.models_to_load():
            bind(catalog.variant(model_id), None, None, None, config.deployment_options(model_id), None, None)
    for variant_id in catalog.variants:
        if variant_id not in routes and variant_id not in unavailable:
            unavailable[variant_id] = (
                "disabled in this deployment's config" if variant_id in config.models
                else "not configured in this deployment (add it under `models:`)"
            )
    if not routes:
        raise ConfigError("no model to serve: list at least one variant under `models:` that fits a pool")
    return Router.options(
        num_replicas=config.serving.router_replicas,
        ray_actor_options={"num_cpus": config.serving.router_num_cpus},
    ).bind(routes, config_data, unavailable)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (``import_path: serve_app.builder:build_app``)."""
    try:
        parsed = BuilderArgs.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "args", BuilderArgs, "application args")) from None
    return build_app_from_config(parsed.app_config())
