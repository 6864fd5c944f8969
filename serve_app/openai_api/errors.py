"""Error answers made at the HTTP layer, in the body every imageserve error has:
``{"error": {"code", "message", "param", "type"}}``."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from serve_app.domain.errors import error_type

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param, "type": error_type(status)}},
                        status_code=status, headers=headers)


# An answer names this many invalid fields at most, each cut to this length: a body of 400,000 unknown
# keys (or one 5 MB key) must not come back as megabytes of error message (bench/amplification.py).
MAX_REPORTED_ERRORS = 5


MAX_REPORTED_NAME = 64


def _field_name(error: dict) -> str:
    name = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "form", "query")) or "body"
    return name if len(name) <= MAX_REPORTED_NAME else name[:MAX_REPORTED_NAME] + "..."


def validation_response(errors: list[dict]) -> JSONResponse:
    param = _field_name(errors[0])
    param = {"body": None, "images": "image"}.get(param, param)
    message = "; ".join(f"{_field_name(e)}: {e['msg']}" for e in errors[:MAX_REPORTED_ERRORS])
    if len(errors) > MAX_REPORTED_ERRORS:
        message += f"; and {len(errors) - MAX_REPORTED_ERRORS} more"
    return error_response(422, "invalid_request", message, param)
