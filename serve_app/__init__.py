"""imageserve: Ray Serve for Z-Image-Turbo generation and Qwen-Image-Edit editing on mixed GPUs."""

from serve_app.catalog import Catalog, GPUClass, ModelVariant, build_catalog, default_catalog
from serve_app.config import AppConfig, ConfigError, load_config
from serve_app.planner import Plan, plan

__all__ = [
    "AppConfig",
    "Catalog",
    "ConfigError",
    "GPUClass",
    "ModelVariant",
    "Plan",
    "build_catalog",
    "default_catalog",
    "load_config",
    "plan",
]
