"""Reading a request body (bounded) and turning pydantic's validation errors into clear 400s."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HttpRequest

from p2pcache.api.errors import ApiError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem, named by its field (``param``) in words a client can act on."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    param = ".".join(loc) or None
    kind = err["type"]
    if kind == "json_invalid":
        why = err.get("ctx", {}).get("error", err["msg"])
        return ApiError(400, f"the request body is not valid JSON: {why}")
    if kind == "model_type" and not loc:
        return ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported field {param!r}", param=param)
    if kind == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param)
    got = err.get("input")
    shown = json.dumps(got)[:80] if not isinstance(got, dict) else "an object"
    msg = err["msg"].removeprefix("Value error, ")
    where = f"field {param!r}: " if param else ""
    return ApiError(400, f"invalid {where}{msg} (got {shown})", param=param)
