"""Config and fleet files: reading them, and the imageserve config inside a Ray Serve config file. What they
hold is validated by the schema (``serve_app/domain/config.py``, ``parse_config`` and ``parse_fleet``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from serve_app.domain.config import AppConfig, ConfigError, FleetConfig, parse_config, parse_fleet


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data or {}


def imageserve_args(serve_config: dict[str, Any], source: str = "serve config") -> dict[str, Any]:
    """The imageserve config inside a Ray Serve config file (its application built by ``serve_app.builder``)."""
    for app in serve_config.get("applications") or []:
        if str(app.get("import_path", "")).startswith("serve_app.builder:"):
            config = (app.get("args") or {}).get("config")
            if not isinstance(config, dict):
                raise ConfigError(f"{source}: the imageserve application has no inline `args.config`")
            return config
    raise ConfigError(f"{source}: no application with import_path serve_app.builder:build_app")


def load_config(path: str | os.PathLike, check_compatibility: bool = True) -> AppConfig:
    """Read and validate an imageserve YAML config, or the imageserve application's config inside a
    Ray Serve config file; relative local paths resolve against the file's folder."""
    path = Path(path)
    data = read_mapping(path, "config")
    if "applications" in data:
        data = imageserve_args(data, str(path))
    config = parse_config(data, str(path), check_compatibility)
    for section, attrs in [*((m, ("source", "transformer_source", "lora_source")) for m in config.models.values()),
                           *((lora, ("source",)) for lora in config.loras.values())]:
        for attr in attrs:
            value = getattr(section, attr)
            if value and value.startswith((".", "~")):
                setattr(section, attr, str((path.parent / Path(value).expanduser()).resolve()))
    return config


def load_fleet(path: str | os.PathLike) -> FleetConfig:
    """Read and validate a fleet file (a mapping with a ``pools:`` list)."""
    path = Path(path)
    return parse_fleet(read_mapping(path, "fleet"), str(path))
