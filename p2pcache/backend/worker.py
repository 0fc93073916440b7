"""Runs the blocking backend off the trio event loop, one call at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from p2pcache.backend.llama_backend import LlamaBackend
from p2pcache.backend.types import Generation, Score, TokenHook
from p2pcache.errors import Overloaded, QueueFull, QueueTimeout, ShuttingDown  # noqa: F401 - re-exported
from p2pcache.keys import SamplingParams

T = TypeVar("T")


class BackendWorker:
    """Serializes model calls on a worker thread; counts what waits for it.

    The queue is bounded: with ``max_waiting`` calls already waiting, a new call fails at once
    with `Overloaded`; a call that waits longer than ``max_wait_s`` fails the same way. Once a
    call holds the model it always runs to completion (its result is not thrown away).
    """

    def __init__(
        self, backend: LlamaBackend, max_waiting: int | None = None, max_wait_s: float | None = None
    ) -> None:
        self.backend = backend
        self._limiter = trio.CapacityLimiter(1)  # one llama context, one caller
        # Text <-> tokens reads only the model's vocabulary, never the context: it runs on
        # threads of its own, beside a model call, so a cache hit never waits for a generation.
        self._text_limiter = trio.CapacityLimiter(2)
        self.waiting = 0  # calls queued behind the running one (queue depth)
        self.max_waiting = max_waiting  # None: unbounded
        self.max_wait_s = max_wait_s  # None: wait as long as it takes
        self.running = False
        self._closing = False
        self._wait_scopes: set[trio.CancelScope] = set()

    def close(self) -> None:
        """Refuse new calls and fail the queued ones (`Overloaded`); the running call finishes."""
        self._closing = True
        for scope in self._wait_scopes:
            scope.cancel()

    async def _acquire(self) -> None:
        if self._closing:
            raise ShuttingDown("the node is shutting down")
        if (
            self.max_waiting is not None
            and self.waiting >= self.max_waiting
            and (self.running or self.waiting)
        ):
            raise QueueFull(f"the model queue is full ({self.waiting} requests waiting)")
        self.waiting += 1
        scope = trio.CancelScope()
        if self.max_wait_s is not None:
            scope.deadline = trio.current_time() + self.max_wait_s
        self._wait_scopes.add(scope)
        try:
            with scope:
                await self._limiter.acquire()
        finally:
            self.waiting -= 1
            self._wait_scopes.discard(scope)
        if scope.cancelled_caught:
            if self._closing:
                raise ShuttingDown("the node is shutting down")
            raise QueueTimeout(f"waited more than {self.max_wait_s:g} s for the model")

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the worker thread, after the calls queued before it."""
        await self._acquire()
        self.running = True
        try:
            # Not abandoned on cancel: the thread owns the llama context until it returns.
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=False)
        finally:
            self.running = False
            self._limiter.release()

    async def run_text(self, fn: Callable[[], T]) -> T:
        """``fn()`` that only tokenizes or detokenizes (`LlamaBackend.tokenize`, `chat_tokens`,
        `detokenize`), off the event loop but not in the model's queue: llama.cpp's tokenizer
        reads the vocabulary only, so it is safe beside a running decode."""
        if self._closing:
            raise ShuttingDown("the node is shutting down")
        return await trio.to_thread.run_sync(fn, limiter=self._text_limiter)

    async def generate(
        self, tokens: Sequence[int], params: SamplingParams, on_token: TokenHook | None = None
    ) -> Generation:
        return await self.run(lambda: self.backend.generate(tokens, params, on_token))

    async def score(
        self, prompt: Sequence[int], completion: Sequence[int], top_k: int = 0
    ) -> Score:
        """`LlamaBackend.score` on the worker thread (teacher-forced log-probs)."""
        return await self.run(lambda: self.backend.score(prompt, completion, top_k=top_k))
