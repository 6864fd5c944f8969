"""Error answers made at the HTTP layer, in the body every imageserve error has:
``{"error": {"code", "message", "param", "type"}}``."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from serve_app.domain.errors import error_type, validation_error

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param, "type": error_type(status)}},
                        status_code=status, headers=headers)


def validation_response(errors: list[dict]) -> JSONResponse:
    err = validation_error(errors)
    return JSONResponse(err.body(), status_code=err.status_code)
