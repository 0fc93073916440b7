"""Server-sent events for ``stream: true``.

An answer that is complete at once (L0, L1, L2, a single-flight join) is sent as one event
per completion token (`complete_response`). An L3 answer is sent token by token while the
model generates it (`LiveSSE`). Both end with the same tail (`tail`): the final chunk with
``finish_reason`` and the full ``x_cache``, the usage chunk if asked for, ``[DONE]``.

How a live stream runs (`LiveSSE.__call__`, one trio nursery per response, no orphans):

- a task resolves the request through the whole ladder with an ``on_token`` hook. The hook
  reaches the model only when this request computes (L3, leading its flight); it runs on the
  model's worker thread, turns the token into text (`LiveText`) and queues the new text for
  the event loop (``TrioToken.run_sync_soon``, which never makes the model thread wait for the
  loop) into an unbounded memory channel (bounded in practice by max_tokens).
- the response waits for whichever comes first: the first piece of text (then it is L3: the
  headers go out with ``X-Cache-Level: L3`` and every further piece is one event), or the end
  of the resolution (then the answer is complete, or an error that still gets its proper
  4xx/5xx status, since nothing was sent yet).
- after the last piece: the rest of the final text (if any), then the tail.

A client that goes away mid-stream does not stop the computation: the model thread cannot be
interrupted anyway, so the generation runs to its end, is stored (the next identical request
is an L0 hit) and wakes any single-flight waiters; only the sending stops. Graceful shutdown
(SIGTERM) waits for live streams like any in-flight request, since they are hypercorn's
request tasks.
"""

from __future__ import annotations

import codecs
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from p2pcache.api.bodies import Bodies, cache_headers, dumps, x_cache, x_cache_live
from p2pcache.api.errors import ApiError, error_body
from p2pcache.backend import TokenHook
from p2pcache.backend.stops import stop_cut
from p2pcache.resolver import Answer, Keyed

log = logging.getLogger("p2pcache.api")

Detokenize = Callable[[Sequence[int]], bytes]
"""Token ids -> their bytes (llama.cpp's ``detokenize``, no UTF-8 decoding)."""

# Previous tokens detokenized with each new one: llama.cpp strips the leading space of the
# first token of a detokenize call, so a token is never detokenized alone.
_WINDOW = 4

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class LiveText:
    """The completion text released token by token, equal to the final text byte for byte.

    ``feed`` runs on the model's thread after each sampled token. Text that could still
    become a stop string is held back (the longest suffix that is a prefix of a stop string),
    and nothing after the first stop string is released, so every piece released is a prefix
    of the text `LlamaBackend.generate` returns (cut at the stop string). The text is built
    from each token's bytes with an incremental UTF-8 decoder, so a character split across
    tokens is released once it is complete (the same text as ``detokenize`` of all tokens,
    at O(1) cost per token instead of detokenizing the whole output every time).
    """

    def __init__(self, detokenize: Detokenize, stops: Sequence[str] = ()) -> None:
        self._detok = detokenize
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.text = ""  # text of all tokens so far
        self.released = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found (or the text went inconsistent)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def feed(self, token: int) -> str:
        """The newly releasable text after ``token`` ("" when there is none)."""
        toks = self.tokens
        toks.append(token)
        i = len(toks) - 1
        j = max(0, i - _WINDOW)
        new = self._detok(toks[j:])
        old = self._detok(toks[j:i]) if i > j else b""
        if not new.startswith(old):  # a vocabulary whose detokenization is not piecewise
            self.stopped = True  # release nothing more; the final text is sent at the end
        before = len(self.text)
        self.text += self._utf8.decode(new[len(old) :])
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stops:
            # Any stop string ends in the new text, else generation would have stopped already.
            cut = stop_cut(self.text, self.stops, new_from=before)
            if cut >= 0:
                end, self.stopped = cut, True
            else:
                end -= self._partial_stop()
        if end <= self.released:
            return ""
        piece = self.text[self.released : end]
        self.released = end
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest suffix of the text that a stop string starts with."""
        text, held = self.text, 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def rest(self, final: str) -> str | None:
        """What is left to send of ``final`` (the answer's text), or None when the released
        text is not a prefix of it (a bug: logged by the caller)."""
        sent = self.text[: self.released]
        return final[len(sent) :] if final.startswith(sent) else None


def text_pieces(answer: Answer, detokenize: Detokenize, stops: Sequence[str]) -> list[str]:
    """A complete answer's text cut at token boundaries, one piece per event. Incremental
    (`LiveText`): a few tokens are detokenized per token, never the whole prefix."""
    live = LiveText(detokenize, stops)
    pieces = [p for t in answer.tokens if (p := live.feed(t))]
    rest = live.rest(answer.text)
    if rest is None:  # the tokens do not spell the text piecewise: send it whole
        return [answer.text]
    if rest:
        pieces.append(rest)
    return pieces


def tail(
    bodies: Bodies, answer: Answer, x: dict[str, Any], include_usage: bool
) -> list[dict[str, Any]]:
    """The chunks after the text: ``finish_reason`` with the full ``x_cache``, then usage."""
    chunks = [bodies.chunk(None, answer.finish_reason, x)]
    if include_usage:
        chunks.append(bodies.usage_chunk(answer, x))
    return chunks


def complete_response(
    answer: Answer, bodies: Bodies, pieces: list[str], include_usage: bool
) -> StreamingResponse:
    """Stream a complete answer as server-sent events, one event per piece of text."""
    x = x_cache(answer)
    chunks = [bodies.chunk(p, None, x, first=i == 0) for i, p in enumerate(pieces or [""])]
    chunks += tail(bodies, answer, x, include_usage)

    async def events() -> AsyncIterator[bytes]:
        for c in chunks:
            yield event(c)
        yield DONE

    headers = cache_headers(answer.cache_level, answer.input_sha256) | {"Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


class LiveSSE:
    """An ASGI response (returned by the endpoint) that resolves the request and streams it.

    ``resolve(on_token)`` runs the ladder; its errors are `ApiError`s (anything else is a
    bug, re-raised). ``detokenize`` and ``stops`` turn tokens into text (`LiveText`);
    ``run_text`` runs that for a complete answer off the event loop (`BackendWorker.run_text`).
    """

    def __init__(
        self,
        *,
        bodies: Bodies,
        keyed: Keyed,
        resolve: Callable[[TokenHook], Awaitable[Answer]],
        detokenize: Detokenize,
        run_text: Callable[[Callable[[], list[str]]], Awaitable[list[str]]],
        stops: Sequence[str],
        include_usage: bool,
    ) -> None:
        self.bodies, self.keyed, self.resolve = bodies, keyed, resolve
        self.run_text = run_text
        self.detokenize, self.stops, self.include_usage = detokenize, tuple(stops), include_usage
        self.live = LiveText(detokenize, stops)
        self.gone = False  # the client disconnected
        self.events = 0

    def _on_token(self, send_piece: trio.MemorySendChannel[str]) -> TokenHook:
        """The hook for the model's thread. It never waits for the event loop: the piece is
        queued with ``run_sync_soon``, whose callbacks run in FIFO order and before the one
        that reports the thread's result, so every piece is in the channel before
        ``compute`` resumes and closes it."""
        live = self.live
        token_ = trio.lowlevel.current_trio_token()

        def deliver(piece: str) -> None:  # on the event loop; must not raise
            try:
                send_piece.send_nowait(piece)
            except Exception:  # unreachable (closed only after the thread returned); an
                # exception escaping a run_sync_soon callback would crash the whole node
                log.exception("could not queue a live piece")

        def on_token(token: int) -> None:  # on the model's worker thread
            try:
                piece = live.feed(token)
                if piece:
                    token_.run_sync_soon(deliver, piece)
            except Exception:  # streaming must never break the generation
                live.stopped = True
                log.exception("live streaming hook failed; the rest is sent at the end")

        return on_token

    async def _send(self, send: Send, message: dict[str, Any]) -> None:
        if self.gone:
            return
        try:
            await send(message)
        except Exception:  # the connection is gone: keep computing, stop sending
            self.gone = True

    async def _event(self, send: Send, obj: Any) -> None:
        self.events += 1
        message = {"type": "http.response.body", "body": event(obj), "more_body": True}
        await self._send(send, message)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                log.info("client left a live stream; finishing the generation to store it")
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        send_piece, pieces = trio.open_memory_channel[str](math.inf)
        answer: Answer | None = None
        error: Exception | None = None
        first: str | None = None
        first_event_ms = 0.0
        x_live = x_cache_live(self.keyed)

        async def compute() -> None:
            nonlocal answer, error
            try:
                answer = await self.resolve(self._on_token(send_piece))
            except Exception as exc:  # sent after the nursery: a 4xx/5xx, or an error event
                error = exc
            finally:
                send_piece.close()  # after the model thread returned: no piece can follow

        async with trio.open_nursery() as nursery:
            nursery.start_soon(compute)
            try:
                first = await pieces.receive()
            except trio.EndOfChannel:
                pass
            if first is not None:  # live: only an L3 computation calls the hook
                nursery.start_soon(self._watch_disconnect, receive)
                headers = cache_headers("L3", self.keyed.key) | {
                    "Cache-Control": "no-cache",
                    "Content-Type": "text/event-stream",
                }
                raw = [
                    (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
                ]
                start = {"type": "http.response.start", "status": 200, "headers": raw}
                await self._send(send, start)
                await self._event(send, self.bodies.chunk(first, None, x_live, first=True))
                first_event_ms = (time.perf_counter() - t0) * 1000
                async for piece in pieces:
                    await self._event(send, self.bodies.chunk(piece, None, x_live))
                nursery.cancel_scope.cancel()  # the disconnect watcher (compute has ended)

        if first is None:  # nothing was sent: a complete answer, or an error with its status
            if error is not None:
                if not isinstance(error, ApiError):
                    raise error
                await error.response()(scope, receive, send)
                return
            assert answer is not None
            done = answer
            text = await self.run_text(lambda: text_pieces(done, self.detokenize, self.stops))
            response = complete_response(answer, self.bodies, text, self.include_usage)
            await response(scope, receive, send)
            return

        if error is not None or answer is None:
            log.error("live stream failed after it started", exc_info=error)
            message = f"generation failed: {error or 'no answer'}"
            await self._event(send, error_body(message, type="server_error"))
        else:
            rest = self.live.rest(answer.text)
            if rest is None:
                key = answer.input_sha256[:12]
                log.error("streamed text is not a prefix of the answer %s", key)
            elif rest:
                await self._event(send, self.bodies.chunk(rest, None, x_live))
            x = x_cache(answer)
            # first_event_ms: from the request's start here; events: text events before this one
            first_ms = round(first_event_ms, 3)
            x["stream"] = {"live": True, "first_event_ms": first_ms, "events": self.events}
            for chunk in tail(self.bodies, answer, x, self.include_usage):
                await self._event(send, chunk)
        await self._send(send, {"type": "http.response.body", "body": DONE, "more_body": False})
