"""Errors a caller sees, with the HTTP status each maps to.

The same classes reach Python handle callers (as raised exceptions) and HTTP callers (as
``{"error": {"code", "message", "param", "type"}}`` bodies), so both see the same reasons.
"""

from __future__ import annotations


def error_type(status_code: int) -> str:
    """OpenAI's error ``type``: the caller's fault below 500, the server's from 500 on."""
    return "invalid_request_error" if status_code < 500 else "server_error"


class ImageServeError(Exception):
    status_code = 500
    code = "internal_error"
    # The ``reason`` label of the error metrics (docs/metrics.md): what kind of failure, not which.
    reason = "internal"
    type: str | None = None  # set only where the status code alone would mislead
    # What the error says where the service hides its internals (``serving.show_internals: false``): set on the
    # kinds whose messages name pools, GPU classes, deployments or replicas (other tenants' placement and load).
    public_message: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def hiding_internals(self) -> ImageServeError:
        """This error as a caller of a multi-tenant endpoint sees it: ``public_message`` where it has one."""
        if self.public_message is None:
            return self
        return type(self)(self.public_message, param=self.param, retry_after_s=self.retry_after_s)

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "param": self.param,
                          "type": self.type or error_type(self.status_code)}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def __reduce__(self):
        # Keep the keyword-only fields when the error crosses a Ray process boundary.
        return (_rebuild, (type(self), self.message, self.param, self.retry_after_s))


def _rebuild(cls, message, param, retry_after_s):
    return cls(message, param=param, retry_after_s=retry_after_s)


class InvalidRequestError(ImageServeError):
    status_code = 422
    code = "invalid_request"
    reason = "bad_input"


# An answer names this many invalid fields at most, each cut to this length: a body of 400,000 unknown
# keys (or one 5 MB key) must not come back as megabytes of error message (bench/amplification.py).
MAX_REPORTED_ERRORS = 5
MAX_REPORTED_NAME = 64


def _field_name(error: dict) -> str:
    name = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "form", "query")) or "body"
    return name if len(name) <= MAX_REPORTED_NAME else name[:MAX_REPORTED_NAME] + "..."


def validation_error(errors: list[dict]) -> InvalidRequestError:
    """The 422 of a request that failed its schema (pydantic's ``errors()``), as the HTTP route and a batch line
    answer it: the first field as ``param``, at most ``MAX_REPORTED_ERRORS`` fields named."""
    param = _field_name(errors[0])
    param = {"body": None, "images": "image"}.get(param, param)
    message = "; ".join(f"{_field_name(e)}: {e['msg']}" for e in errors[:MAX_REPORTED_ERRORS])
    if len(errors) > MAX_REPORTED_ERRORS:
        message += f"; and {len(errors) - MAX_REPORTED_ERRORS} more"
    return InvalidRequestError(message, param=param)


class LimitExceededError(InvalidRequestError):
    """A well-typed request over a bound of the model or of this deployment: a variant's sizes, steps or
    input images, what the planner says a batch fits, the configured cost bound. The message names the
    bound; the OpenAPI schema cannot, since the bounds depend on the variant and the config."""

    code = "limit_exceeded"


class UnsupportedValueError(ImageServeError):
    """A well-formed value these models cannot honour (OpenAI answers those with 400)."""

    status_code = 400
    code = "unsupported_value"
    reason = "bad_input"


class BadImageError(ImageServeError):
    status_code = 400
    code = "invalid_image"
    reason = "bad_input"


class UnsupportedImageTypeError(BadImageError):
    status_code = 415
    code = "unsupported_image_type"


class ModelNotFoundError(ImageServeError):
    status_code = 404
    code = "model_not_found"
    reason = "bad_input"


class LoraNotFoundError(ImageServeError):
    """A per-request LoRA that is not on the service's list (``loras:``): like an unknown model, a name the
    schema cannot enumerate."""

    status_code = 404
    code = "lora_not_found"
    reason = "bad_input"


class ResourceNotFoundError(ImageServeError):
    """A file or batch id this caller has none of (another key's objects are not found either)."""

    status_code = 404
    code = "not_found"
    reason = "bad_input"


class ModelUnavailableError(ImageServeError):
    """The model exists in the catalog but no replica of this deployment can serve it."""

    status_code = 503
    code = "model_unavailable"
    reason = "unavailable"
    public_message = "the model asked for is not served on this endpoint now"


class NotReadyError(ImageServeError):
    """The service is up but some served variant has no running replica yet (loading, or being replaced)."""

    status_code = 503
    code = "not_ready"
    reason = "unavailable"


class OverloadedError(ImageServeError):
    status_code = 429
    code = "overloaded"
    reason = "backpressure"
    type = "server_error"  # a 4xx, but not the caller's doing


class RateLimitedError(ImageServeError):
    """The caller's key is over its own rate or in-flight limit (serving.limits.per_key); others are not."""

    status_code = 429
    code = "rate_limit_exceeded"
    reason = "rate_limited"
    type = "requests"  # what OpenAI's API calls a request-rate limit


class RequestCancelledError(ImageServeError):
    status_code = 499
    code = "cancelled"
    reason = "cancelled"
    type = "server_error"


class InternalError(ImageServeError):
    """An unexpected failure; reported as 503 (retryable) rather than a bare 500."""

    status_code = 503
    code = "internal_error"
    public_message = "the request failed on the server; retry shortly"


class ReplicaOutOfMemoryError(ImageServeError):
    """The GPU ran out of memory for this request; the replica freed it and keeps serving."""

    status_code = 503
    code = "out_of_memory"
    reason = "oom"
    public_message = "the GPU ran out of memory for this request; retry, or ask for a smaller size or fewer images"
