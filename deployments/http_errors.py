"""Error bodies and the ASGI pieces that keep every failure in one shape.

Every error answers ``{"error": {"code", "message", "param"}}``: bad input is a 4xx naming the
field (``param``) and the reason; an index, shard or replica that cannot answer now (its data is
unavailable, its actor died or is restarting, a transient failure) is a 503 whose message names
it; a model a route needs that cannot be loaded (not trained yet) is a 503 ``model_unavailable``
saying how to make it available, and the routes that do not need it keep answering; a deployment
whose queue is full (``max_queued_requests``) sheds the request at once with a 503 ``overloaded``
and ``Retry-After``; only a bug is a 500.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.errors import (
    IndexUnavailableError,
    InvalidRequestError,
    NotFoundError,
    RetryableError,
    RiverbedError,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiError(Exception):
    """Raised by a handler to answer ``status`` with an error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


class ModelUnavailableError(RiverbedError):
    """A model that a route needs cannot be loaded now (HTTP 503 ``model_unavailable``); the
    message says why and what makes it available (e.g. the command that trains it)."""


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The error shape. A message or param quoting bad input may hold a lone surrogate, which no
    response body could encode: each is written as an escape (``\\ud800``) instead."""
    return {"error": {"code": code, "message": _encodable(message), "param": _encodable(param)}}


def _encodable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def cause(exc: BaseException) -> BaseException:
    """The exception a task or replica raised, out of Ray's wrappers: a ``RayTaskError`` (or the
    class Ray derives from it and the cause's class) keeps it as ``cause``, and a replica that
    re-raises a task's error nests them, so every level is unwrapped."""
    for _ in range(8):  # bounded: wrappers never nest deeper
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    return exc


def as_api_error(exc: BaseException) -> ApiError | None:
    """The HTTP answer for an error raised by a deployment, or None for a bug (a 500).

    400 for bad input; 503 for an unavailable index or shard, a transient failure, or a Ray actor
    or system failure (a replica or actor that died or is restarting: trouble, not a bug)."""
    exc = cause(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, "invalid_request", str(exc), exc.param)
    if isinstance(exc, NotFoundError):
        return ApiError(404, "not_found", str(exc), exc.param)
    if isinstance(exc, BackPressureError):
        retry_after = max(1, math.ceil(exc.retry_after_s or 1.0))
        return ApiError(
            503,
            "overloaded",
            f"the server is at capacity ({_first_line(exc)}); retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, ModelUnavailableError):
        return ApiError(503, "model_unavailable", str(exc))
    if isinstance(exc, IndexUnavailableError):
        return ApiError(503, "index_unavailable", str(exc))
    if isinstance(exc, RetryableError):
        return ApiError(503, "unavailable", f"{exc}; retry shortly")
    if isinstance(exc, RayActorError):
        return ApiError(
            503, "unavailable", f"a serving actor is unavailable: {_first_line(exc)}; retry shortly"
        )
    if isinstance(exc, RayError) and not isinstance(exc, RayTaskError):
        return ApiError(503, "unavailable", f"{type(exc).__name__}: {_first_line(exc)}; retry shortly")
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _param(loc: tuple[int | str, ...]) -> str | None:
    """``("body", "filter", "year")`` → ``"filter.year"``; the whole body → None."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _unreadable(parse_error: BaseException) -> str:
    """Why FastAPI's JSON parser failed other than by a syntax error (it answers those with a bare
    400 that chains the parser's exception): nesting deeper than Python recurses, or bytes that
    are not UTF-8."""
    if isinstance(parse_error, RecursionError):
        return "the body is not JSON we can read: nested too deeply"
    return f"the body is not valid JSON: {type(parse_error).__name__}: {_first_line(parse_error)}"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path: a 405 names only those of the first
    route whose path matched (GET and DELETE of one path are two routes)."""
    return ", ".join(sorted(_methods_at(request.app.router.routes, request.scope["path"])))


def _methods_at(routes: Sequence[Any], path: str) -> set[str]:
    """The methods of ``routes`` whose path matches ``path``, looking into included routers
    (FastAPI keeps ``include_router``'s routes, and its prefix, on a node of their own)."""
    methods: set[str] = set()
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            prefix = route.include_context.prefix
            if path.startswith(prefix):
                methods |= _methods_at(included.routes, path.removeprefix(prefix) or "/")
        elif getattr(route, "path_regex", None) is not None and route.path_regex.match(path):
            methods |= getattr(route, "methods", None) or set()
    return methods


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx")
            detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return error_response(400, "invalid_json", f"the body is not valid JSON: {detail}")
        param = _param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "missing":
            message = "field required"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, "invalid_request", f"{param or 'body'}: {message}", param)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            return error_response(400, "invalid_json", _unreadable(exc.__cause__))
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        code = codes.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})  # kept: a 405 says Allow
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        known = as_api_error(exc)
        if known is not None:
            return error_response(known.status, known.code, known.message, known.param)
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(cause(exc)).__name__})")


_max_body_bytes = 1024 * 1024


def set_max_body_bytes(limit: int) -> None:
    """The process-wide body limit that :class:`BodyLimit` enforces (set by the ingress replica)."""
    global _max_body_bytes
    _max_body_bytes = limit


def max_body_bytes() -> int:
    return _max_body_bytes


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before any handler reads it, whether
    its size is declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int] = max_body_bytes) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, limit)


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body parsing lets it through (it turns others into a 400).
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


async def _send_413(send: Send, limit: int) -> None:
    await send_error(send, 413, "body_too_large", f"the request body exceeds {limit} bytes")


async def send_error(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """Answers an error in the shape, straight from ASGI middleware (before any handler runs)."""
    body = json.dumps(error_body(code, message)).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
