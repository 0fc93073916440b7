"""HTTP errors: OpenAI's error shape, and the one table from exception types to statuses.

Every error body is ``{"error": {"message", "type", "param", "code"}}``. Exceptions from the
ladder and the model's queue are told apart by their type (`p2pcache.errors`), never by
their message: `ApiError.of` looks the type up in `TABLE` (most specific class first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from p2pcache.errors import (
    ComputationFailed,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    Unavailable,
)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object (also sent as an SSE event when a live stream fails)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ErrorKind:
    """How one exception type is answered."""

    status: int
    type: str
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hint: str = ""  # appended to the exception's message: what the client should do
    blames_input: bool = False  # param: the request's input field ("prompt" or "messages")


_OVERLOADED = "the node is overloaded, retry later"

TABLE: dict[type[Exception], ErrorKind] = {
    PromptTooLong: ErrorKind(
        400, "invalid_request_error", "context_length_exceeded", blames_input=True
    ),
    InvalidRequest: ErrorKind(400, "invalid_request_error"),
    QueueFull: ErrorKind(429, "rate_limit_error", "queue_full", {"Retry-After": "1"}, _OVERLOADED),
    QueueTimeout: ErrorKind(503, "unavailable", "queue_timeout", {"Retry-After": "5"}, _OVERLOADED),
    ShuttingDown: ErrorKind(503, "unavailable", "shutting_down", hint="retry on another node"),
}
"""Exception type -> answer. Types not here (and not under a type here) are bugs: 500."""


def _kind(exc: BaseException) -> tuple[BaseException, ErrorKind] | None:
    # A single-flight waiter gets what the request it waited on got (its cause).
    if isinstance(exc, ComputationFailed) and exc.__cause__ is not None:
        return _kind(exc.__cause__)
    for cls in type(exc).__mro__:
        kind = TABLE.get(cls)
        if kind is not None:
            return exc, kind
    return None


class ApiError(Exception):
    """An error response: raised by the endpoints, answered by the app's route wrapper."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = headers or {}
        self.refused = refused  # nothing was computed (overload, shutdown): counted by code

    @classmethod
    def of(cls, exc: BaseException, input_field: str | None = None) -> ApiError | None:
        """The response `TABLE` gives ``exc``; None when the table has no row for it.
        ``input_field``: the request's input ("prompt" or "messages"), the ``param`` of
        errors that blame it."""
        found = _kind(exc)
        if found is None:
            return None
        cause, kind = found
        message = f"{cause}; {kind.hint}" if kind.hint else str(cause)
        param = getattr(cause, "param", None) or (input_field if kind.blames_input else None)
        return cls(
            kind.status,
            message,
            type=kind.type,
            param=param,
            code=kind.code,
            headers=dict(kind.headers),
            refused=isinstance(cause, Unavailable),
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
