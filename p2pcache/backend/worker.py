"""Runs the blocking backend off the trio event loop, one call at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from p2pcache.backend.llama_backend import Generation, LlamaBackend
from p2pcache.keys import SamplingParams

T = TypeVar("T")


class BackendWorker:
    """Serializes model calls on a worker thread; counts what waits for it."""

    def __init__(self, backend: LlamaBackend) -> None:
        self.backend = backend
        self._limiter = trio.CapacityLimiter(1)  # one llama context, one caller
        self.waiting = 0  # calls queued behind the running one (queue depth)

    async def run(self, fn: Callable[[], T]) -> T:
        self.waiting += 1
        try:
            await self._limiter.acquire()
        finally:
            self.waiting -= 1
        try:
            # Not abandoned on cancel: the thread owns the llama context until it returns.
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=False)
        finally:
            self._limiter.release()

    async def generate(self, tokens: Sequence[int], params: SamplingParams) -> Generation:
        return await self.run(lambda: self.backend.generate(tokens, params))
