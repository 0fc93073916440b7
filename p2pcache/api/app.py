"""The node's HTTP API (ASGI, Starlette; served on trio by hypercorn).

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
  events, live while an L3 answer is generated: `p2pcache.api.streaming`), ``GET /v1/models``:
  OpenAI-compatible. Every answer says which cache level served it: the ``x_cache`` object in
  the body (every chunk when streamed; a live stream's timings come in its final chunk) and
  the ``X-Cache-Level`` header.
- ``GET /admin/status``, ``/admin/cache``, ``/admin/peers``, ``/admin/reputation``,
  ``/admin/providers``, ``GET /metrics`` (Prometheus), ``GET /healthz``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request, 404 for an unknown model, 413 for an oversize body, 429 when the model's queue is
full, 503 while shutting down or after waiting too long for the model.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import asdict
from collections.abc import AsyncIterator
from typing import Any

import trio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from p2pcache import __version__
from p2pcache.api.schemas import ChatCompletionRequest, CompletionRequest, _Base
from p2pcache.api.streaming import Chunk, LiveSSE, LiveText
from p2pcache.backend import Overloaded, PromptTooLong, TokenHook
from p2pcache.keys import SamplingParams
from p2pcache.node.logs import fields
from p2pcache.node.runtime import NodeRuntime
from p2pcache.resolver import Answer, Request
from p2pcache.resolver.ladder import Keyed

log = logging.getLogger("p2pcache.api")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class FastJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content)


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    param = ".".join(loc) or None
    kind = err["type"]
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
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


async def _read_body(request: HttpRequest, limit: int) -> bytes:
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


class Api:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.node = runtime.local
        self.config = runtime.config
        self.metrics = runtime.metrics

    # -- OpenAI ---------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name not in (self.rt.model_id, self.node.model_hash):
            raise ApiError(
                404,
                f"the model {name!r} does not exist on this node; it serves {self.rt.model_id!r} "
                f"(GET /v1/models)",
                param="model", code="model_not_found",
            )

    def _params(self, body: _Base, max_tokens: int | None) -> SamplingParams:
        max_tokens = self.config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens {max_tokens} exceeds this node's limit of {self.config.max_tokens_limit}",
                param="max_tokens",
            )
        given = {
            k: v for k, v in {
                "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "min_p": body.min_p, "repeat_penalty": body.repeat_penalty, "seed": body.seed,
            }.items() if v is not None
        }
        try:
            return SamplingParams(max_tokens=max_tokens, stop=body.stops(), **given)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def _parse(self, request: HttpRequest, model: type[_Base]) -> _Base:
        if self.rt.draining:
            raise ApiError(503, "the node is shutting down; retry on another node", type="unavailable",
                           code="shutting_down")
        raw = await _read_body(request, self.config.max_body_bytes)
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        self._check_model(body.model)
        return body

    async def _resolve(
        self, req: Request, keyed: list[Keyed] | None = None, on_token: TokenHook | None = None
    ) -> Answer:
        """Run the ladder; ``on_token`` streams an L3 computation live (``keyed`` gets the
        tokenized request first, for the live chunks' ``x_cache``)."""
        t0 = time.perf_counter()
        try:
            if on_token is None:
                answer = await self.node.resolve(req)
            else:
                k = self.node.resolver.keyed(req)
                if keyed is not None:
                    keyed.append(k)
                answer = await self.node.resolver.resolve(req, on_token, k)
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), param="messages" if req.messages else "prompt",
                           code="context_length_exceeded") from None
        except Overloaded as exc:
            raise self._overloaded(exc) from None
        except RuntimeError as exc:
            if isinstance(exc.__cause__, Overloaded):  # the identical request we waited on was refused
                raise self._overloaded(exc.__cause__) from None
            raise
        except ValueError as exc:  # e.g. an empty prompt, a bad grammar
            raise ApiError(400, str(exc)) from None
        level = answer.cache_level
        self.metrics.answers.labels(level).inc()
        self.metrics.latency.labels(level).observe(time.perf_counter() - t0)
        if answer.single_flight:
            self.metrics.single_flight.inc()
        return answer

    def _overloaded(self, exc: Overloaded) -> ApiError:
        if exc.shutting_down:
            self.metrics.rejected.labels("shutting_down").inc()
            return ApiError(503, f"{exc}; retry on another node", type="unavailable", code="shutting_down")
        if "waited" in str(exc):
            self.metrics.rejected.labels("queue_timeout").inc()
            return ApiError(503, f"{exc}; the node is overloaded, retry later", type="unavailable",
                            code="queue_timeout", headers={"Retry-After": "5"})
        self.metrics.rejected.labels("queue_full").inc()
        return ApiError(429, f"{exc}; the node is overloaded, retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": "1"})

    def _x_cache(self, a: Answer) -> dict[str, Any]:
        x = {
            "level": a.cache_level,
            "input_sha256": a.input_sha256,
            "model_hash": a.model_hash,
            "single_flight": a.single_flight,
            "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(a.timings).items()},
            **({"semantic": self._semantic(a)} if a.cache_level == "L1" else {}),
        }
        if a.peer is not None:  # L2: which peer, verified, fetch and verification times
            x["peer"] = asdict(a.peer)
        if a.kv_peer is not None:  # L3 resumed from KV chunks fetched from a peer
            x["kv_peer"] = {k: v for k, v in asdict(a.kv_peer).items() if v is not None}
        return x

    @staticmethod
    def _semantic(a: Answer) -> dict[str, Any]:
        """An L1 answer's evidence: how similar the cached prompt was and what the gate scored."""
        d = a.semantic
        if d is None:
            return {}
        return {"similarity": d.similarity, "tau": d.tau, "source_input_sha256": d.source_input_sha256, "gate": d.gate}

    def _headers(self, a: Answer) -> dict[str, str]:
        return {"X-Cache-Level": a.cache_level, "X-Cache-Key": a.input_sha256}

    def _share(self, body: _Base) -> bool:
        return self.config.share_by_default if body.share is None else body.share

    async def completions(self, request: HttpRequest) -> Response | LiveSSE:
        body = await self._parse(request, CompletionRequest)
        assert isinstance(body, CompletionRequest)
        req = Request(prompt=body.prompt_text, params=self._params(body, body.max_tokens), share=self._share(body),
                      semantic=body.semantic)
        if body.stream:
            created = int(time.time())
            rid = "cmpl-" + uuid.uuid4().hex

            def chunk(text: str | None, finish: str | None, x: dict[str, Any]) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": created, "model": self.rt.model_id,
                        "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
                        "x_cache": x}
            return self._stream(req, chunk, body.include_usage, lambda c: c)
        answer = await self._resolve(req)
        created = int(time.time())
        rid = "cmpl-" + uuid.uuid4().hex
        usage = _usage(answer)
        return FastJSON(
            {
                "id": rid, "object": "text_completion", "created": created, "model": self.rt.model_id,
                "choices": [{"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}],
                "usage": usage, "system_fingerprint": None, "x_cache": self._x_cache(answer),
            },
            headers=self._headers(answer),
        )

    async def chat_completions(self, request: HttpRequest) -> Response | LiveSSE:
        body = await self._parse(request, ChatCompletionRequest)
        assert isinstance(body, ChatCompletionRequest)
        messages = tuple(m.as_template_message() for m in body.messages)
        req = Request(messages=messages, params=self._params(body, body.token_limit), share=self._share(body),
                      semantic=body.semantic)
        if body.stream:
            created = int(time.time())
            rid = "chatcmpl-" + uuid.uuid4().hex

            def chunk(text: str | None, finish: str | None, x: dict[str, Any]) -> dict[str, Any]:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.rt.model_id,
                        "system_fingerprint": None,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                        "x_cache": x}

            def first(c: dict[str, Any]) -> dict[str, Any]:
                c["choices"][0]["delta"]["role"] = "assistant"
                return c

            return self._stream(req, chunk, body.include_usage, first)
        answer = await self._resolve(req)
        created = int(time.time())
        rid = "chatcmpl-" + uuid.uuid4().hex
        usage = _usage(answer)
        return FastJSON(
            {
                "id": rid, "object": "chat.completion", "created": created, "model": self.rt.model_id,
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                    "logprobs": None, "finish_reason": answer.finish_reason,
                }],
                "usage": usage, "system_fingerprint": None, "x_cache": self._x_cache(answer),
            },
            headers=self._headers(answer),
        )

    def _stream(self, req: Request, chunk: Chunk, include_usage: bool, first: Any) -> LiveSSE:
        """``stream: true``: live events while an L3 answer is generated, else `_sse`."""
        keyed: list[Keyed] = []
        live = LiveText(lambda toks: self.node.backend.llm.detokenize(list(toks)), req.params.stop)

        def x_live() -> dict[str, Any]:  # per-token chunks: the level and key (timings come last)
            k = keyed[0]
            return {"level": "L3", "input_sha256": k.key, "model_hash": k.model_hash, "single_flight": False}

        def error_event(exc: Exception) -> dict[str, Any]:
            return {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                              "code": None}}

        return LiveSSE(
            live=live,
            resolve=lambda on_token: self._resolve(req, keyed=keyed, on_token=on_token),
            chunk=chunk, first=first, x_live=x_live, x_final=self._x_cache,
            usage=_usage if include_usage else None,
            headers=lambda level: {"X-Cache-Level": level, "X-Cache-Key": keyed[0].key},
            buffered=lambda a: self._sse(a, chunk, _usage(a) if include_usage else None, first),
            error_response=lambda exc: exc.response() if isinstance(exc, ApiError) else None,
            error_event=error_event, dumps=_dumps,
        )

    def _sse(self, answer: Answer, chunk: Chunk, usage: dict[str, int] | None, first: Any) -> StreamingResponse:
        """Stream a complete answer as server-sent events, one event per completion token."""
        pieces = self._pieces(answer)
        x = self._x_cache(answer)

        async def events() -> AsyncIterator[bytes]:
            for i, piece in enumerate(pieces or [""]):
                c = chunk(piece, None, x)
                yield b"data: " + _dumps(first(c) if i == 0 else c) + b"\n\n"
            yield b"data: " + _dumps(chunk(None, answer.finish_reason, x)) + b"\n\n"
            if usage is not None:
                u = chunk(None, None, x)
                u["choices"] = []
                u["usage"] = usage
                yield b"data: " + _dumps(u) + b"\n\n"
            yield b"data: [DONE]\n\n"

        headers = self._headers(answer) | {"Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _pieces(self, answer: Answer) -> list[str]:
        """The answer's text cut at token boundaries (the text may be cut short by a stop string)."""
        text, out, prev = answer.text, [], 0
        detok = self.node.backend.detokenize
        for i in range(1, len(answer.tokens) + 1):
            end = min(len(detok(answer.tokens[:i])), len(text))
            if end > prev:
                out.append(text[prev:end])
                prev = end
        if prev < len(text):
            out.append(text[prev:])
        return out

    async def models(self, request: HttpRequest) -> Response:
        return FastJSON({"object": "list", "data": [self._model_card()]})

    async def model(self, request: HttpRequest) -> Response:
        self._check_model(request.path_params["model"])
        return FastJSON(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.rt.model_id, "object": "model", "created": int(self.rt.started_at),
            "owned_by": "p2pcache", "x_model_hash": self.node.model_hash,
            "x_context_window": self.node.backend.config.n_ctx,
        }

    # -- admin ----------------------------------------------------------------------
    def _admin(self, request: HttpRequest) -> None:
        token = self.config.admin_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise ApiError(401, "this endpoint needs 'Authorization: Bearer <admin_token>'",
                           type="authentication_error")

    def status_doc(self) -> dict[str, Any]:
        worker, node = self.node.worker, self.node
        return {
            "peer_id": node.identity.peer_id,
            "model": self.rt.model_id,
            "model_hash": node.model_hash,
            "model_path": str(node.backend.config.model_path),
            "addrs": self.rt.network.addrs(),
            "listen": list(self.config.listen),
            "bootstrap": list(self.rt.bootstrap),
            "http": list(self.rt.http_urls),
            "data_dir": str(node.data_dir.root),
            "version": __version__,
            "uptime_s": round(time.time() - self.rt.started_at, 3),
            "draining": self.rt.draining,
            "share_by_default": self.config.share_by_default,
            "queue_depth": worker.waiting,
            "max_queue": worker.max_waiting,
            "model_busy": worker.running,
            "computations": node.resolver.computations,
        }

    async def status(self, request: HttpRequest) -> Response:
        self._admin(request)
        return FastJSON(self.status_doc())

    async def cache(self, request: HttpRequest) -> Response:
        self._admin(request)
        s = await trio.to_thread.run_sync(self.node.store.stats)  # may flush hit counters (fsync)
        doc: dict[str, Any] = {**vars(s), "hit_rate": s.hit_rate, "model_hash": self.node.model_hash}
        doc["answers_by_level"] = {
            lvl: int(self.metrics.answers.labels(lvl)._value.get()) for lvl in ("L0", "L1", "L2", "L3")
        }
        raw = request.query_params.get("entries", "0")
        if not raw.isdigit() or int(raw) > 1000:
            raise ApiError(400, "entries must be an integer from 0 to 1000", param="entries")
        if n := int(raw):
            def recent() -> list[Any]:
                return sorted(self.node.store.iter_entries(), key=lambda e: max(e.inserted_at, e.last_hit_at),
                              reverse=True)[:n]

            entries = await trio.to_thread.run_sync(recent)
            doc["entries"] = [
                {"input_sha256": e.input_sha256, "model_hash": e.model_hash, "cache_level": e.cache_level,
                 "privacy_flag": e.privacy_flag, "hits": e.hits, "size": e.size, "producer": e.producer,
                 "inserted_at": e.inserted_at, "last_hit_at": e.last_hit_at, "text": e.output.text[:200]}
                for e in entries
            ]
        return FastJSON(doc)

    async def peers(self, request: HttpRequest) -> Response:
        self._admin(request)
        net = self.rt.network
        stats = net.stats() if hasattr(net, "stats") else {}
        return FastJSON({"peer_id": self.node.identity.peer_id, "peers": net.peers(), "stats": stats})

    async def reputation(self, request: HttpRequest) -> Response:
        """Every peer's record, or one peer's (``?peer_id=``) with its evidence spelled out."""
        self._admin(request)
        peer = request.query_params.get("peer_id")
        if peer is not None and not _PEER_ID.fullmatch(peer):
            raise ApiError(400, "peer_id must be a base58 libp2p peer id", param="peer_id")
        rows = self.rt.network.reputation(peer) if peer else self.rt.network.reputation()
        return FastJSON({"peer_id": self.node.identity.peer_id, "peers": rows})

    async def providers(self, request: HttpRequest) -> Response:
        """Peers that advertised ``key`` (gossip index), optionally waiting up to ``wait_s`` for
        the first advert to arrive: lets scripts wait for propagation on an event, not a sleep."""
        self._admin(request)
        q = request.query_params
        key, level = q.get("key", ""), q.get("level", "decoder_final")
        if not _KEY.fullmatch(key):
            raise ApiError(400, "key must be 64 lowercase hex characters (an input_sha256)", param="key")
        if level not in ("decoder_final", "kv_prefix"):
            raise ApiError(400, "level must be decoder_final or kv_prefix", param="level")
        try:
            wait_s = float(q.get("wait_s", "0"))
        except ValueError:
            wait_s = -1.0
        if not 0.0 <= wait_s <= 60.0:
            raise ApiError(400, "wait_s must be a number from 0 to 60", param="wait_s")
        wait = getattr(self.rt.network, "wait_providers", None)
        found = await wait(key, level, wait_s) if wait is not None else []
        return FastJSON({"peer_id": self.node.identity.peer_id, "key": key, "level": level, "providers": found})

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        self._admin(request)
        body = await trio.to_thread.run_sync(self.metrics.render)  # reads store stats (may fsync)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: HttpRequest) -> Response:
        if self.rt.draining:
            return FastJSON({"status": "draining"}, status_code=503)
        return FastJSON({"status": "ok"})

    def live_values(self) -> dict[str, Any]:
        s = self.node.store.stats()
        rep = self.rt.network.reputation()
        return {
            "queue_depth": self.node.worker.waiting, "running": self.node.worker.running,
            "computations": self.node.resolver.computations, "entries": s.entries, "bytes": s.bytes,
            "peers": len(self.rt.network.peers()),
            "peer_scores": [(str(p.get("peer_id")), float(p.get("score", 0.0))) for p in rep],
        }


_KEY = re.compile(r"[0-9a-f]{64}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")


def _usage(a: Answer) -> dict[str, int]:
    p, c = a.timings.prompt_tokens, a.timings.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _wrap(handler: Any) -> Any:
    async def endpoint(request: HttpRequest) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    return endpoint


class Observe:
    """ASGI middleware: counts every request by route and status and logs it."""

    ROUTES = frozenset({
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/status", "/admin/cache",
        "/admin/peers", "/admin/reputation", "/admin/providers", "/metrics", "/healthz",
    })

    def __init__(self, app: ASGIApp, runtime: NodeRuntime) -> None:
        self.app, self.metrics = app, runtime.metrics

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
            route = path if path in self.ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.requests.labels(route, str(status)).inc()
            if log.isEnabledFor(logging.INFO):
                log.info("request", extra=fields(
                    method=scope["method"], path=path, status=status, cache_level=level,
                    ms=round((time.perf_counter() - t0) * 1000, 3),
                    client=(scope.get("client") or ("", 0))[0],
                ))


def create_app(runtime: NodeRuntime) -> ASGIApp:
    api = Api(runtime)
    runtime.metrics.watch(api.live_values)
    routes = [
        Route("/v1/completions", _wrap(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", _wrap(api.chat_completions), methods=["POST"]),
        Route("/v1/models", _wrap(api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _wrap(api.model), methods=["GET"]),
        Route("/admin/status", _wrap(api.status), methods=["GET"]),
        Route("/admin/cache", _wrap(api.cache), methods=["GET"]),
        Route("/admin/peers", _wrap(api.peers), methods=["GET"]),
        Route("/admin/reputation", _wrap(api.reputation), methods=["GET"]),
        Route("/admin/providers", _wrap(api.providers), methods=["GET"]),
        Route("/metrics", _wrap(api.metrics_endpoint), methods=["GET"]),
        Route("/healthz", _wrap(api.healthz), methods=["GET"]),
    ]

    async def not_found(request: HttpRequest, exc: Exception) -> Response:
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    async def not_allowed(request: HttpRequest, exc: Exception) -> Response:
        return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return ApiError(500, "internal error (see the node's log)", type="server_error").response()

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_allowed, 500: server_error, Exception: server_error},
    )
    app.state.api = api
    return Observe(app, runtime)
