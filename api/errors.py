"""Every error leaves the API as {"error": {"code", "message", "details"}} with a sentence a person can act on."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException

from kiln.storage import StoreUnavailable

log = logging.getLogger("kiln.api")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class InvalidRequest(ApiError):
    status = 422
    code = "validation_error"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(ApiError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def error_response(status: int, code: str, message: str, details: Any = None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_path(loc: tuple, body: Any) -> str:
    """The path as the user wrote it: pydantic adds a discriminated union's tag (model.mlp.hidden),
    which is dropped here by walking the submitted body alongside the location."""
    parts, node = [str(loc[0])], body if loc[0] == "body" else None
    for part in loc[1:]:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts)


def database_unavailable(exc: DBAPIError) -> JSONResponse:
    """The answer to a request the database could not serve (down, restarting, cut off): a 503 to retry."""
    log.warning("database error: %s", exc.__class__.__name__, exc_info=exc)
    return error_response(
        503, "database_unavailable", "The database is unavailable; try again in a few seconds.",
        headers={"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": _field_path(e["loc"], exc.body),
                "message": e["msg"].removeprefix("Value error, "),
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        fields = ", ".join(dict.fromkeys(d["field"] for d in details))
        message = f"The request is invalid; fix these fields: {fields}."
        return error_response(422, "validation_error", message, details)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else f"{phrase}."
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        return database_unavailable(exc)

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("%s", exc)  # the sentence names the bucket and what is wrong, for the operator
        return error_response(
            503, "storage_unavailable", "The artifact store is unavailable; try again in a few seconds.",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "Something went wrong on the server; it has been logged.")
