"""The HTTP app without a model: the exception -> HTTP table, the response bodies, the SSE text
pieces, and the app served over ASGI with a stand-in resolver."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from p2pcache.api import ApiSettings, NodeContext, create_app
from p2pcache.api.bodies import ChatBodies, CompletionBodies, x_cache
from p2pcache.api.errors import ApiError
from p2pcache.api.sse import text_pieces
from p2pcache.errors import (
    BadResponse,
    ComputationFailed,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from p2pcache.metrics import NodeMetrics
from p2pcache.resolver import Answer, Keyed, KvPeerDetails, PeerDetails, Request, Timings

VOCAB = {1: b"a", 2: b" E", 3: b"N", 4: b"D", 5: b"\xe2\x82", 6: b"\xac", 7: b"x"}


def detok(tokens: Sequence[int]) -> bytes:
    return b"".join(VOCAB[t] for t in tokens)


def answer(text: str = "a Ex", tokens: Sequence[int] = (1, 2, 7), **kw: Any) -> Answer:
    fields: dict[str, Any] = dict(
        text=text,
        tokens=list(tokens),
        finish_reason="stop",
        cache_level="L0",
        input_sha256="ab" * 32,
        model_hash="cd" * 32,
        timings=Timings(prompt_tokens=3, completion_tokens=len(tokens)),
    )
    return Answer(**{**fields, **kw})


# -- the table --------------------------------------------------------------------------------
def test_each_exception_type_has_its_status_code_and_headers() -> None:
    full = ApiError.of(QueueFull("the model queue is full (1 requests waiting)"))
    assert full is not None and (full.status, full.type, full.code) == (
        429,
        "rate_limit_error",
        "queue_full",
    )
    assert full.headers == {"Retry-After": "1"} and full.refused
    assert (
        full.message
        == "the model queue is full (1 requests waiting); the node is overloaded, retry later"
    )
    late = ApiError.of(QueueTimeout("waited more than 0.3 s for the model"))
    assert late is not None and (late.status, late.code, late.headers) == (
        503,
        "queue_timeout",
        {"Retry-After": "5"},
    )
    down = ApiError.of(ShuttingDown("the node is shutting down"))
    assert down is not None and (down.status, down.type, down.code) == (
        503,
        "unavailable",
        "shutting_down",
    )
    assert down.message == "the node is shutting down; retry on another node" and down.headers == {}
    long = ApiError.of(PromptTooLong("too long"), "messages")
    assert long is not None and (long.status, long.code, long.param) == (
        400,
        "context_length_exceeded",
        "messages",
    )
    assert not long.refused
    bad = ApiError.of(InvalidRequest("bad grammar"), "prompt")
    assert bad is not None and (bad.status, bad.code, bad.param, bad.message) == (
        400,
        None,
        None,
        "bad grammar",
    )
    assert (
        ApiError.of(BadResponse("x")) is None and ApiError.of(ValueError("x")) is None
    )  # bugs: 500


def test_a_single_flight_waiter_is_answered_as_the_request_it_waited_on() -> None:
    def failed(cause: BaseException) -> ComputationFailed:
        try:
            raise ComputationFailed("the identical request this one waited on failed") from cause
        except ComputationFailed as exc:
            return exc

    err = ApiError.of(failed(QueueTimeout("waited more than 1 s for the model")))
    assert err is not None and (err.status, err.code) == (503, "queue_timeout")
    assert err.message.startswith("waited more than 1 s")
    assert ApiError.of(failed(RuntimeError("boom"))) is None


# -- bodies and pieces -----------------------------------------------------------------------
def test_x_cache_per_level_evidence() -> None:
    kv = KvPeerDetails(
        peer="p", tokens=16, chunks=1, bytes=10, fetch_ms=1.0, spot_checked=False, rejected=False
    )
    x = x_cache(answer(cache_level="L3", kv_peer=kv))
    assert list(x) == ["level", "input_sha256", "model_hash", "single_flight", "timings", "kv_peer"]
    assert "spot_check_diff" not in x["kv_peer"] and x["kv_peer"]["tokens"] == 16
    peer = PeerDetails(peer="p", producer="q", verified=True, fetch_ms=1.5, verify_ms=2.5, bytes=9)
    assert x_cache(answer(cache_level="L2", peer=peer))["peer"] == {
        "peer": "p",
        "producer": "q",
        "verified": True,
        "fetch_ms": 1.5,
        "verify_ms": 2.5,
        "bytes": 9,
    }


def test_bodies_shapes() -> None:
    a = answer()
    doc = CompletionBodies("m").answer(a)
    assert list(doc) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
        "x_cache",
    ]
    assert doc["id"].startswith("cmpl-") and doc["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }
    chat = ChatBodies("m")
    assert chat.answer(a)["choices"][0]["message"] == {
        "role": "assistant",
        "content": "a Ex",
        "refusal": None,
    }
    first = chat.chunk("a", None, {}, first=True)
    assert first["choices"][0]["delta"] == {"content": "a", "role": "assistant"}
    assert chat.chunk(None, "stop", {})["choices"][0]["delta"] == {}
    u = chat.usage_chunk(a, {})
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 6 and u["id"] == first["id"]


def test_text_pieces_are_cut_at_tokens_and_join_to_the_text() -> None:
    assert text_pieces(answer("a Ex", (1, 2, 7)), detok, ()) == ["a", " E", "x"]
    assert text_pieces(answer("a€x", (1, 5, 6, 7)), detok, ()) == ["a", "€", "x"]
    assert (
        "".join(text_pieces(answer("a", (1, 2, 3, 4)), detok, (" END",))) == "a"
    )  # cut at the stop
    assert text_pieces(answer("other", (1, 2)), detok, ()) == ["other"]  # tokens do not spell it


# -- the app over ASGI, with a stand-in resolver ----------------------------------------------
class FakeResolver:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.computations = fail, 0

    async def keyed(self, request: Request) -> Keyed:
        return Keyed(request, [1, 2], "ab" * 32, "cd" * 32)

    async def resolve(
        self, request: Request, on_token: Any = None, keyed: Keyed | None = None
    ) -> Answer:
        if self.fail is not None:
            raise self.fail
        return answer()


def context(tmp_path: Path, fail: BaseException | None = None, **settings: Any) -> NodeContext:
    async def run_text(fn: Any) -> Any:
        return fn()

    worker = SimpleNamespace(
        waiting=0,
        running=False,
        max_waiting=None,
        backend=SimpleNamespace(
            detokenize_bytes=detok, chat_format=SimpleNamespace(name="template")
        ),
        run_text=run_text,
    )
    store = SimpleNamespace(stats=lambda: SimpleNamespace(entries=0, bytes=0))
    return NodeContext(
        settings=ApiSettings(**settings),
        resolver=FakeResolver(fail),
        store=store,  # type: ignore[arg-type]
        worker=worker,
        peer_id="12D3KooWtest",
        model_hash="cd" * 32,
        model_id="m",  # type: ignore[arg-type]
        model_path=tmp_path / "m.gguf",
        n_ctx=1024,
        data_dir=tmp_path,
        metrics=NodeMetrics(),
    )


_apps: dict[int, Any] = {}


def call(ctx: NodeContext, method: str, path: str, **kw: Any) -> httpx.Response:
    app = _apps.get(id(ctx)) or _apps.setdefault(id(ctx), create_app(ctx))  # one app per node

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # 500s are answers
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.request(method, path, **kw)

    return trio.run(go)


BODY = {"model": "m", "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (QueueFull("the model queue is full"), 429, "queue_full"),
        (QueueTimeout("waited more than 1 s for the model"), 503, "queue_timeout"),
        (ShuttingDown("the node is shutting down"), 503, "shutting_down"),
    ],
)
def test_refusals_get_their_status_and_are_counted(
    tmp_path: Path, exc: Exception, status: int, code: str
) -> None:
    ctx = context(tmp_path, fail=exc)
    for stream in (False, True):
        r = call(ctx, "POST", "/v1/completions", json={**BODY, "stream": stream})
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    metrics = call(ctx, "GET", "/metrics").text
    assert f'p2pcache_rejected_total{{reason="{code}"}} 2.0' in metrics


def test_an_unmapped_error_is_a_logged_500(tmp_path: Path) -> None:
    r = call(context(tmp_path, fail=RuntimeError("bug")), "POST", "/v1/completions", json=BODY)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_answers_stream_and_admin(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    r = call(ctx, "POST", "/v1/completions", json=BODY)
    assert (
        r.status_code == 200
        and r.headers["X-Cache-Level"] == "L0"
        and r.json()["choices"][0]["text"] == "a Ex"
    )
    r = call(
        ctx,
        "POST",
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == "a Ex"
    )
    assert (
        chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        and chunks[-1]["usage"]["total_tokens"] == 6
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    st = call(ctx, "GET", "/admin/status").json()
    assert st["model"] == "m" and st["data_dir"] == str(tmp_path) and st["addrs"] == []
    assert call(ctx, "GET", "/admin/peers").json() == {
        "peer_id": "12D3KooWtest",
        "peers": [],
        "stats": {},
    }
    card = call(ctx, "GET", "/v1/models/m").json()
    assert card["x_context_window"] == 1024 and card["x_chat_format"] == "template"


def test_draining_and_admin_token(tmp_path: Path) -> None:
    ctx = context(tmp_path, admin_token="s3cret")
    assert call(ctx, "GET", "/admin/status").status_code == 401
    assert call(ctx, "GET", "/metrics").status_code == 401
    assert (
        call(ctx, "GET", "/admin/status", headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    ctx.draining = True
    r = call(ctx, "POST", "/v1/completions", json=BODY)
    assert r.status_code == 503 and r.json()["error"] == {
        "message": "the node is shutting down; retry on another node",
        "type": "unavailable",
        "param": None,
        "code": "shutting_down",
    }
    assert call(ctx, "GET", "/healthz").status_code == 503
