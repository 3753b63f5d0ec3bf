"""OpenAI-style errors: one exception type, and handlers that give every failure the same body shape.

FastAPI's default 422 for validation errors becomes a 400 `invalid_request_error` naming the
offending parameter (an unknown or unsupported one included); malformed JSON, unknown routes and
unexpected exceptions get the same shape.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln_engine.server.protocol import (
    UNSUPPORTED_PARAMETERS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
)

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error the API reports to the client with a status and an OpenAI-style body."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or _TYPE_BY_STATUS.get(status_code, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump(mode="json")

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic/FastAPI validation error as a 400 naming its parameter."""
    errors = exc.errors()
    if not errors:
        return OpenAIError("invalid request", param=None, code="invalid_request")
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return OpenAIError(
            f"request body is not valid JSON: {ctx.get('error', first.get('msg', ''))}", code="invalid_json"
        )
    if kind == "model_attributes_type" or (not loc and kind in {"dict_type", "model_type"}):
        return OpenAIError("request body must be a JSON object", code="invalid_body")
    # Union members add their type name to the location (e.g. ["stop", "str"]): keep the field path.
    param = ".".join(p for p in loc if not _is_type_tag(p)) or None
    msg = str(first.get("msg", "invalid value"))
    if kind == "missing":
        return OpenAIError(f"missing required parameter '{param}'", param=param, code="missing_parameter")
    if kind == "extra_forbidden":
        return _extra_parameter(param or "", loc[-1] if loc else "")
    return OpenAIError(f"invalid value for '{param}': {msg}", param=param, code="invalid_parameter")


# Top-level request fields, for a "did you mean" on a misspelt one.
_KNOWN_FIELDS = sorted({*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields})


def _extra_parameter(param: str, name: str) -> OpenAIError:
    """A 400 for a parameter the request models do not have: unsupported (known to OpenAI) or unknown."""
    why = UNSUPPORTED_PARAMETERS.get(name)
    if why is not None:
        return OpenAIError(
            f"unsupported parameter '{param}': {why} by this server",
            param=param,
            code="unsupported_parameter",
        )
    close = difflib.get_close_matches(name, _KNOWN_FIELDS, n=1) if param == name else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return OpenAIError(f"unknown parameter '{param}'{hint}", param=param, code="unknown_parameter")


def _is_type_tag(part: str) -> bool:
    return part in {
        "str",
        "int",
        "float",
        "bool",
        "list[str]",
        "list[int]",
        "list[TextPart]",
        "TextPart",
    } or (part.startswith(("constrained-", "function-")) or part.startswith("list["))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app returns an OpenAI-style body; validation errors are 400, never 422."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(str(exc.detail), exc.status_code, code=code).response(
            headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return OpenAIError(f"internal error: {type(exc).__name__}", 500, type="server_error").response()
