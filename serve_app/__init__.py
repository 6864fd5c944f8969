"""imageserve: Ray Serve for Z-Image-Turbo generation and Qwen-Image-Edit editing on mixed GPU fleets.

The public API: ``build_app`` (``serve_app.builder``, the ``import_path`` of serve_config.yaml), and
the types a Python handle caller sends and gets back, re-exported here.
"""

from serve_app.domain.config import AppConfig, ConfigError
from serve_app.domain.config_files import load_config
from serve_app.domain.errors import (
    ImageServeError,
    InvalidRequestError,
    LimitExceededError,
    LoraNotFoundError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
    ReplicaOutOfMemoryError,
    RequestCancelledError,
)
from serve_app.domain.schemas import (
    EditRequest,
    GenerateRequest,
    ImageResult,
    LoraRequest,
    PartialImage,
    StreamAccepted,
)

__version__ = "0.1.0"

__all__ = [
    "AppConfig",
    "ConfigError",
    "EditRequest",
    "GenerateRequest",
    "ImageResult",
    "ImageServeError",
    "InvalidRequestError",
    "LimitExceededError",
    "LoraNotFoundError",
    "LoraRequest",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "OverloadedError",
    "PartialImage",
    "ReplicaOutOfMemoryError",
    "RequestCancelledError",
    "StreamAccepted",
    "__version__",
    "load_config",
]
