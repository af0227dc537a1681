"""OpenAI's error envelope, {"error": {"message", "type", "param", "code"}}, and the handlers
that map every failure to it with the right status. Messages are capped: a huge or hostile
request body is never echoed back."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.services.openai.engine_client import EngineDeadError, EngineRequestError
from tandem.shared.sampling_params import InvalidParameterError

MAX_MESSAGE_CHARS = 512

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def cap(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": cap(message), "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def error_of(exc: BaseException) -> APIError:
    """Any failure as an APIError (for SSE error events, which have no status line of their own)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return APIError(400, str(exc), exc.param)
    if isinstance(exc, EngineRequestError):
        return APIError(exc.code, str(exc), exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) from pydantic's errors: field paths and reasons, never the input values."""
    parts, param = [], None
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = ".".join(loc)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more error(s)")
    return cap("; ".join(parts)), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    for cls in (APIError, InvalidParameterError, EngineRequestError, EngineDeadError):
        @app.exception_handler(cls)
        async def _api(request: Request, exc: Exception) -> JSONResponse:
            err = error_of(exc)
            return error_response(err.status, err.message, err.param, err.code)
