"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

As in vLLM, `type` names the error class and `code` repeats the HTTP status:

| status | type | when |
|---|---|---|
| 400 | BadRequestError | OpenAI's invalid_request_error: bad JSON, wrong types, bad values, prompt too long |
| 401 | AuthenticationError | missing or wrong API key |
| 404 | NotFoundError | unknown model or route |
| 413 | RequestTooLargeError | request body too large |
| 429 | RateLimitError | an API key over its rate limit (with Retry-After) |
| 503 | ServiceUnavailableError | engine not ready, fleet saturated (with Retry-After), queue timeout |
| 500 | InternalServerError | a bug: logged with its traceback, answered without it |

Validation errors never become 422, and a user's mistake never becomes a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: int | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "APIError")
        self.param = param
        self.code = status if code is None else code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer", **self.headers} if self.status == 401 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model")


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key; send it as 'Authorization: Bearer <key>'.")


def from_value_error(err: ValueError) -> APIError:
    """A `SamplingParams` (or request) ValueError: its message starts with the field's name."""
    message = str(err)
    first = message.split(" ", 1)[0]
    param = first if first.isidentifier() and first.islower() else None
    return bad_request(message, param=param)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    # Drop the union-branch names pydantic inserts (e.g. "list[str]", "function-after[...]").
    parts = [p for p in parts if "[" not in p]
    return ".".join(parts)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable one-line message and the first offending field from pydantic's error list."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"Malformed JSON in request body: {detail}".rstrip(": "), None
    lines: list[str] = []
    seen: set[str] = set()
    first_param: str | None = None
    for err in errors:
        param = _loc_to_param(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        line = f"{param}: {msg}" if param else msg
        if "input" in err and err.get("type") != "missing" and param:
            line += f" (got {_short(err['input'])})"
        if line in seen:
            continue
        seen.add(line)
        lines.append(line)
        first_param = first_param or (param or None)
    if not lines:
        return "Invalid request body.", None
    return "Invalid request: " + "; ".join(lines[:5]), first_param


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Map APIError, validation errors, ValueError, HTTP errors and bugs to OpenAI-style bodies."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return bad_request(message, param=param).response()

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return from_value_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route for {request.method} {request.url.path}."
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error ({type(exc).__name__}).").response()
