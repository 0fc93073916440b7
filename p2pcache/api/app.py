"""The node's HTTP app (ASGI, Starlette; served on trio by hypercorn): the routes, the admin
token check, and the middleware that counts and logs every request.

The endpoints live by job: `p2pcache.api.openai` (``/v1``), `p2pcache.api.admin` (``/admin``,
``/metrics``, ``/healthz``). Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}`` with the statuses of `p2pcache.api.errors.TABLE`, plus 401 without the
admin token (403 for a non-loopback client of a node without one), 404 for an unknown model
or endpoint, 405, 413 for an oversize body and 500 for a bug (logged).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from p2pcache.api.admin import AdminApi
from p2pcache.api.context import NodeContext, is_loopback
from p2pcache.api.errors import ApiError
from p2pcache.api.openai import OpenAiApi
from p2pcache.logs import fields
from p2pcache.metrics import NodeMetrics

log = logging.getLogger("p2pcache.api")

Endpoint = Callable[[HttpRequest], Awaitable[ASGIApp]]
"""A route's handler: a `Response`, or another ASGI response such as `p2pcache.api.sse.LiveSSE`."""


def _answer_errors(handler: Endpoint) -> Endpoint:
    async def endpoint(request: HttpRequest) -> ASGIApp:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    return endpoint


def _admin_only(token: str | None, handler: Endpoint) -> Endpoint:
    """With an admin token configured, the endpoint needs ``Authorization: Bearer <token>``;
    without one, it answers loopback clients only: cache contents, peers and the data dir are
    never shown to another machine by default (a reverse proxy on this host makes every
    client loopback: then configure a token)."""

    async def endpoint(request: HttpRequest) -> ASGIApp:
        if token:
            given = request.headers.get("authorization", "")
            # compare_digest: the time taken does not tell how much of a guess was right
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise ApiError(
                    401,
                    "this endpoint needs 'Authorization: Bearer <admin_token>'",
                    type="authentication_error",
                )
        elif not is_loopback(request.client.host if request.client else None):
            raise ApiError(
                403,
                "admin endpoints answer loopback clients only while the node has no "
                "admin_token; set admin_token and send 'Authorization: Bearer <admin_token>'",
                type="permission_error",
            )
        return await handler(request)

    return endpoint


class Observe:
    """ASGI middleware: counts every request by route and status and logs it."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, paths: frozenset[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    def _route(self, path: str) -> str:
        """The metrics label: the route, not the raw path (bounded label values)."""
        if path in self.paths:
            return path
        return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status, level = 500, None

        async def send_(message: Message) -> None:
            nonlocal status, level
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message.get("headers", ()):
                    if k == b"x-cache-level":
                        level = v.decode()
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope["path"]
            self.metrics.requests.labels(self._route(path), str(status)).inc()
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra=fields(
                        method=scope["method"],
                        path=path,
                        status=status,
                        cache_level=level,
                        ms=round((time.perf_counter() - t0) * 1000, 3),
                        client=(scope.get("client") or ("", 0))[0],
                    ),
                )


def create_app(ctx: NodeContext) -> ASGIApp:
    v1, admin = OpenAiApi(ctx), AdminApi(ctx)
    ctx.metrics.watch(admin.live_values)

    def guarded(handler: Endpoint) -> Endpoint:
        return _admin_only(ctx.settings.admin_token, handler)

    routes = [
        Route("/v1/completions", _answer_errors(v1.completions), methods=["POST"]),
        Route("/v1/chat/completions", _answer_errors(v1.chat_completions), methods=["POST"]),
        Route("/v1/models", _answer_errors(v1.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _answer_errors(v1.model), methods=["GET"]),
        Route("/admin/status", _answer_errors(guarded(admin.status)), methods=["GET"]),
        Route("/admin/cache", _answer_errors(guarded(admin.cache)), methods=["GET"]),
        Route("/admin/peers", _answer_errors(guarded(admin.peers)), methods=["GET"]),
        Route("/admin/reputation", _answer_errors(guarded(admin.reputation)), methods=["GET"]),
        Route("/admin/providers", _answer_errors(guarded(admin.providers)), methods=["GET"]),
        Route("/metrics", _answer_errors(guarded(admin.metrics)), methods=["GET"]),
        Route("/healthz", _answer_errors(admin.healthz), methods=["GET"]),
        Route("/p2p", _answer_errors(admin.p2p), methods=["GET"]),
    ]

    async def not_found(request: HttpRequest, exc: Exception) -> Response:
        message = f"no such endpoint: {request.method} {request.url.path}"
        return ApiError(404, message, code="not_found").response()

    async def not_allowed(request: HttpRequest, exc: Exception) -> Response:
        message = f"method {request.method} not allowed on {request.url.path}"
        return ApiError(405, message).response()

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return ApiError(500, "internal error (see the node's log)", type="server_error").response()

    handlers = {404: not_found, 405: not_allowed, 500: server_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    paths = frozenset(r.path for r in routes if "{" not in r.path)
    return Observe(app, ctx.metrics, paths)
