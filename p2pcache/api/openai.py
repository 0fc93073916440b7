"""The OpenAI-compatible endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` as server-sent events, `p2pcache.api.sse`), ``GET /v1/models``.

Every answer says which cache level served it: the ``x_cache`` object in the body (every chunk
when streamed; a live stream's timings come in its final chunk) and the ``X-Cache-Level``
header.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from p2pcache.api.bodies import Bodies, ChatBodies, CompletionBodies, FastJSON, cache_headers
from p2pcache.api.context import NodeContext
from p2pcache.api.errors import ApiError
from p2pcache.api.parse import parse_json, read_body
from p2pcache.api.schemas import ChatCompletionRequest, CompletionRequest, _Base
from p2pcache.api.sse import LiveSSE
from p2pcache.backend import TokenHook
from p2pcache.errors import ShuttingDown
from p2pcache.keys import SamplingParams
from p2pcache.resolver import Answer, Keyed, Request

B = TypeVar("B", bound=_Base)


class OpenAiApi:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    # -- endpoints ----------------------------------------------------------------------
    async def completions(self, http: HttpRequest) -> Response | LiveSSE:
        body = await self._parse(http, CompletionRequest)
        req = Request(
            prompt=body.prompt_text,
            params=self._params(body, body.max_tokens),
            share=self._share(body),
            semantic=body.semantic,
        )
        return await self._respond(req, CompletionBodies, body.stream, body.include_usage)

    async def chat_completions(self, http: HttpRequest) -> Response | LiveSSE:
        body = await self._parse(http, ChatCompletionRequest)
        messages = tuple(m.as_template_message() for m in body.messages)
        req = Request(
            messages=messages,
            params=self._params(body, body.token_limit),
            share=self._share(body),
            semantic=body.semantic,
        )
        return await self._respond(req, ChatBodies, body.stream, body.include_usage)

    async def models(self, http: HttpRequest) -> Response:
        return FastJSON({"object": "list", "data": [self._model_card()]})

    async def model(self, http: HttpRequest) -> Response:
        self._check_model(http.path_params["model"])
        return FastJSON(self._model_card())

    # -- answering ----------------------------------------------------------------------
    async def _respond(
        self, req: Request, bodies: type[Bodies], stream: bool, include_usage: bool
    ) -> Response | LiveSSE:
        t0 = time.perf_counter()
        with self._errors(req):
            keyed = await self.ctx.resolver.keyed(req)
        if stream:  # live while an L3 answer is generated, else one event per token
            return LiveSSE(
                bodies=bodies(self.ctx.model_id),
                keyed=keyed,
                resolve=lambda on_token: self._resolve(keyed, t0, on_token),
                detokenize=self.ctx.worker.backend.detokenize_bytes,
                run_text=self.ctx.worker.run_text,
                stops=keyed.request.params.stop,  # with the chat format's stops
                include_usage=include_usage,
            )
        answer = await self._resolve(keyed, t0)
        return FastJSON(
            bodies(self.ctx.model_id).answer(answer),
            headers=cache_headers(answer.cache_level, answer.input_sha256),
        )

    async def _resolve(self, keyed: Keyed, t0: float, on_token: TokenHook | None = None) -> Answer:
        """Run the ladder; ``on_token`` streams an L3 computation live."""
        with self._errors(keyed.request):
            answer = await self.ctx.resolver.resolve(keyed.request, on_token, keyed)
        m, level = self.ctx.metrics, answer.cache_level
        m.answers.labels(level).inc()
        m.latency.labels(level).observe(time.perf_counter() - t0)
        if answer.single_flight:
            m.single_flight.inc()
        return answer

    @contextmanager
    def _errors(self, req: Request | None = None) -> Iterator[None]:
        """Exceptions `ApiError.of` knows become their response; the rest are bugs (500)."""
        try:
            yield
        except ApiError:
            raise
        except Exception as exc:
            err = ApiError.of(exc, None if req is None else _input_field(req))
            if err is None:
                raise
            if err.refused:
                self.ctx.metrics.rejected.labels(err.code or "unavailable").inc()
            raise err from None

    # -- request checks -----------------------------------------------------------------
    async def _parse(self, http: HttpRequest, model: type[B]) -> B:
        if self.ctx.draining:
            with self._errors():  # refused as the table says for a draining node
                raise ShuttingDown("the node is shutting down")
        body = parse_json(await read_body(http, self.ctx.settings.max_body_bytes), model)
        self._check_model(body.model)
        return body

    def _check_model(self, name: str) -> None:
        if name not in (self.ctx.model_id, self.ctx.model_hash):
            raise ApiError(
                404,
                f"the model {name!r} does not exist on this node; it serves {self.ctx.model_id!r} "
                f"(GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _params(self, body: _Base, max_tokens: int | None) -> SamplingParams:
        settings = self.ctx.settings
        max_tokens = settings.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} exceeds this node's limit of {settings.max_tokens_limit}",
                param="max_tokens",
            )
        given = {
            k: v
            for k, v in {
                "temperature": body.temperature,
                "top_p": body.top_p,
                "top_k": body.top_k,
                "min_p": body.min_p,
                "repeat_penalty": body.repeat_penalty,
                "seed": body.seed,
            }.items()
            if v is not None
        }
        try:  # SamplingParams checks its values with ValueError (the schema already did)
            return SamplingParams(max_tokens=max_tokens, stop=body.stops(), **given)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def _share(self, body: _Base) -> bool:
        return self.ctx.settings.share_by_default if body.share is None else body.share

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.ctx.model_id,
            "object": "model",
            "created": int(self.ctx.started_at),
            "owned_by": "p2pcache",
            "x_model_hash": self.ctx.model_hash,
            "x_context_window": self.ctx.n_ctx,
            # "template": the model's chat template; "transcript": a base model continues a
            # plain User:/Assistant: dialogue, cut where it starts the next turn.
            "x_chat_format": self.ctx.worker.backend.chat_format.name,
        }


def _input_field(req: Request) -> str:
    """The request field that holds its input (the ``param`` of errors that blame it)."""
    return "messages" if req.messages is not None else "prompt"
