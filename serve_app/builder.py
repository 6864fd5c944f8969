"""The application builder that ``serve_config.yaml``'s ``import_path`` points at.

``build_app(args)`` validates its ``args`` (an inline config or a config file), creates one
deployment per served variant with that variant's Ray options, and binds the router over them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve import Application

from serve_app.config import AppConfig, ConfigError, DeploymentOptions, format_validation_error, load_config, parse_config


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


def serve_options(options: DeploymentOptions, config: AppConfig) -> dict[str, Any]:
    """Ray Serve ``.options(...)`` for a model deployment."""
    if options.num_gpus is not None:
        num_gpus = options.num_gpus
    elif config.device.device == "cuda" or (config.device.device == "auto" and _cluster_has_gpus()):
        num_gpus = 1.0
    else:
        num_gpus = 0.0
    actor: dict[str, Any] = {
        "num_gpus": num_gpus,
        "num_cpus": options.num_cpus if options.num_cpus is not None else (1.0 if num_gpus else 0.0),
    }
    if options.resources:
        actor["resources"] = dict(options.resources)
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


def build_app_from_config(config: AppConfig) -> Application:
    from deployments.editing import EditServer
    from deployments.generation import GenerationServer
    from deployments.router import Router

    catalog = config.build_catalog()
    config_data = config.model_dump(mode="json")
    routes: dict[str, list[dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}
    for model_id in config.models_to_load():
        variant = catalog.variant(model_id)
        server = GenerationServer if variant.task == "generate" else EditServer
        name = deployment_name(variant.task, model_id)
        bound = server.options(name=name, **serve_options(config.deployment_options(model_id), config)).bind(
            model_id, config_data
        )
        routes[model_id] = [{"pool": "default", "gpu_class": None, "deployment": name, "handle": bound}]
    for variant_id in catalog.variants:
        if variant_id not in routes:
            unavailable[variant_id] = (
                "disabled in this deployment's config" if variant_id in config.models
                else "not configured in this deployment (add it under `models:`)"
            )
    if not routes:
        raise ConfigError("no model to serve: list at least one variant under `models:`")
    return Router.options(num_replicas=config.serving.router_replicas).bind(routes, config_data, unavailable)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (``import_path: serve_app.builder:build_app``)."""
    try:
        parsed = BuilderArgs.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "args", BuilderArgs, "application args")) from None
    return build_app_from_config(parsed.app_config())
