"""The edit route's multipart form, parsed under limits: files, fields and each part's size."""

from __future__ import annotations

import logging

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class FormLimitError(HTTPException):
    """A multipart form over one of its limits, with the error code and param the answer carries (an
    HTTPException, since FastAPI turns any other exception raised while it parses a form into a bare 400)."""

    def __init__(self, status_code: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.code = code
        self.param = param


class BoundedFormRequest(Request):
    """A request whose multipart form is parsed under ``limits`` (max_files, max_fields, max_part_size), the
    lower of these and any FastAPI asks for, with Starlette's refusals turned into imageserve's errors."""

    limits: dict[str, int] = {}

    async def _get_form(self, **requested):
        limits = {name: min(value, requested.get(name, value)) for name, value in self.limits.items()}
        try:
            return await super()._get_form(**limits)
        except StarletteHTTPException as err:
            raise self._refusal(str(err.detail), limits) from None

    @staticmethod
    def _refusal(detail: str, limits: dict[str, int]) -> HTTPException:
        if detail.startswith("Too many files"):
            return FormLimitError(422, "limit_exceeded", f"at most {limits['max_files']} images per edit", "image")
        if detail.startswith("Too many fields"):
            return FormLimitError(422, "limit_exceeded", f"more than {limits['max_fields']} form fields")
        if detail.startswith("Part exceeded"):
            return FormLimitError(413, "request_too_large",
                                  f"a form field over the {limits['max_part_size'] / 1e3:g} KB limit")
        return FormLimitError(400, "invalid_request", f"unreadable multipart body: {detail}")


def bounded_form_route(limits: dict[str, int]) -> type[APIRoute]:
    """An APIRoute class whose requests parse their forms under ``limits`` (FastAPI's custom route pattern)."""
    request_class = type("LimitedFormRequest", (BoundedFormRequest,), {"limits": dict(limits)})

    class BoundedFormRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def bounded(request: Request):
                return await handler(request_class(request.scope, request.receive))

            return bounded

    return BoundedFormRoute
