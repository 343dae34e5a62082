"""One error shape for every failure, and the ASGI middleware that guards the API's edges.

Every 4xx/5xx body is OpenAI's `{"error": {"message", "type", "code", "param"}}`, so the
official clients raise their usual exceptions with our message in them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.http_schemas import ErrorResponse
from storage.errors import InvalidArgumentError, NotFoundError, StoreBusyError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_DESCRIPTIONS = {
    400: "Malformed request: invalid JSON, or a value the server cannot serve.",
    401: "Missing or malformed `Authorization: Bearer <admin token>` header.",
    403: "Wrong admin token, admin endpoints disabled, or someone else's message.",
    404: "The message, user, job or model does not exist.",
    413: "Request body larger than the server's limit.",
    422: "A field has the wrong type or an invalid value.",
    429: "Too many requests from this user; retry after `Retry-After` seconds.",
}

WHOLE_BODY_ERRORS = {"missing", "model_attributes_type", "dict_type", "model_type"}
WHOLE_BODY_MESSAGE = "the request body must be a JSON object (Content-Type: application/json)"


class ApiError(Exception):
    """Raised by route code; rendered as the standard error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses an operation can answer."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def _describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    parts: list[str] = []
    first: str | None = None
    for error in errors[:5]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        if where == "body" and error.get("type") in WHOLE_BODY_ERRORS:
            parts.append(WHOLE_BODY_MESSAGE)
        else:
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, first


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure (ours, FastAPI's, Starlette's, unexpected) to the standard body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(InvalidArgumentError)
    async def _store_refused(request: Request, exc: InvalidArgumentError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFoundError) else 422
        return error_response(status, str(exc), "invalid_value")

    @app.exception_handler(StoreBusyError)
    async def _busy(request: Request, exc: StoreBusyError) -> JSONResponse:
        message = "the database is busy; retry in a few seconds"
        return error_response(503, message, "busy", headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx: Any = next(
                (e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {}
            )
            reason = ctx.get("error", "syntax error") if isinstance(ctx, dict) else "syntax error"
            return error_response(400, f"request body is not valid JSON: {reason}", "invalid_json")
        message, param = _describe_validation(errors)
        return error_response(422, message, "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return error_response(exc.status_code, message, None, None, exc.headers)


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413 before anything parses them.

    Nothing over the limit is kept. The rest of a refused body is read and dropped (up to
    `drain_bytes`) before answering, so a client still sending gets a clean 413 instead of a
    reset connection; beyond that the connection is closed at once.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 8 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number", "bad_length")
                return
            if size > self.max_bytes:
                if size <= self.drain_bytes:
                    await self._drain(receive, 0)
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            more = bool(message.get("more_body", False))
            if total > self.max_bytes:
                chunks.clear()
                if more:
                    await self._drain(receive, total)
                await self._refuse(send)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, seen: int) -> None:
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send: Send) -> None:
        message = f"request body is larger than the {self.max_bytes} byte limit"
        await _send_error(send, 413, message, "body_too_large")


class ServerErrors:
    """Turn an unexpected exception into a logged 500 with the standard body.

    FastAPI's own catch-all re-raises after answering, which would crash an in-process test
    client; this one swallows it once the error is logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                message = f"internal error ({type(exc).__name__}); it has been logged"
                await _send_error(send, 500, message, "internal")


class RequestCounter:
    """Count finished requests by route template, method and status, for /metrics."""

    def __init__(self, app: ASGIApp, counts: Counter[tuple[str, str, int]]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.counts[(path, scope.get("method", "?"), status)] += 1
