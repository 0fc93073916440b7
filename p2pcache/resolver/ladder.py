"""The lookup ladder: L0 exact -> (L1 semantic) -> (L2 peers) -> L3 local inference.

Each rung is a `Tier`: it gets the keyed request and either answers or passes. L3 is not a
tier but the fallback that runs the model and stores the result, so that the next identical
request is an L0 hit. The node's composition root (`p2pcache.node.build`) gives the resolver
its tiers, KV prefix cache and KV peers when it builds it; nothing is added later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import lmdb
import trio

from p2pcache.backend import BackendWorker, TokenHook
from p2pcache.errors import ComputationFailed
from p2pcache.identity import Identity
from p2pcache.keys import input_sha256
from p2pcache.resolver.types import (
    Answer,
    Keyed,
    KvPeerDetails,
    Level,
    Request,
    Timings,
    answer_from_output,
    own_entry,
)
from p2pcache.store import Entry, Output, Store, StoreError

if TYPE_CHECKING:
    from p2pcache.kv import KvPrefixCache, PrefixGeneration

__all__ = ["ExactTier", "Keyed", "KvRemote", "Resolver", "Tier"]

log = logging.getLogger(__name__)


INLINE_TOKENIZE_CHARS = 256
"""Requests with at most this many characters of text are tokenized on the event loop
(~0.15 ms on a 2-core CPU with Gemma 3's tokenizer, about what a hop to a thread costs)."""


def with_chat_stops(request: Request, stops: Sequence[str]) -> Request:
    """A chat request with the model's chat-format stops added to its own (a base model's
    transcript ends where the model starts the next turn). In the params, so the key, the
    stored entry and a verifying peer all see them."""
    if request.messages is None or set(stops) <= set(request.params.stop):
        return request
    return replace(request, params=request.params.with_(stop=(*request.params.stop, *stops)))


def _text_size(request: Request) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(str(m.get("content") or "")) for m in request.messages or ())


class KvRemote(Protocol):
    """KV prefix chunks from peers around an L3 run (`p2pcache.net.kv_tier.KvPeerTier`)."""

    async def prefetch(self, keyed: Keyed) -> Any:
        """Fetch the prompt's missing prefix chunks (stored locally); never raises."""

    async def after_generate(
        self, keyed: Keyed, pg: PrefixGeneration, fetched: Any
    ) -> KvPeerDetails | None:
        """After the run: advertise what it stored; returns what the peer's chunks gave."""


class Tier(Protocol):
    """A rung of the ladder."""

    level: Level

    async def lookup(self, keyed: Keyed) -> Answer | None:
        """The answer from this level, or None to pass to the next one."""

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """Called after L3 stored ``entry`` (L1 indexes its prompt, L2 advertises it)."""


class ExactTier:
    """L0: the stored `decoder_final` for this exact key."""

    level: Level = "L0"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def lookup(self, keyed: Keyed) -> Answer | None:
        entry = self.store.get(keyed.key)  # one LMDB read: microseconds, fine on the loop
        if (
            entry is None
            or entry.cache_level != "decoder_final"
            or entry.model_hash != keyed.model_hash
        ):
            return None
        self.store.record_hit(keyed.key)
        return answer_from_output(entry.output, keyed, self.level)

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """The entry is in the store already: nothing to do."""


class _Flight:
    """An in-progress computation that identical requests wait on (single-flight)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.output: Output | None = None
        self.error: BaseException | None = None


class Resolver:
    """Answers requests from the first tier that has the answer, else computes it (L3).

    ``tiers`` come after L0 (which is always first), in order. ``kv``: L3 resumes from stored KV
    prefixes (`p2pcache.kv`); ``kv_remote``: before such a run, the prompt's missing prefix
    chunks are fetched from peers (needs ``kv``).
    """

    def __init__(
        self,
        store: Store,
        worker: BackendWorker,
        model_hash: str,
        identity: Identity,
        tiers: Sequence[Tier] = (),
        kv: KvPrefixCache | None = None,
        kv_remote: KvRemote | None = None,
    ) -> None:
        if kv_remote is not None and kv is None:
            raise ValueError("kv_remote needs a KV prefix cache (kv)")
        self.store = store
        self.worker = worker
        self.model_hash = model_hash
        self.identity = identity
        self.tiers: tuple[Tier, ...] = (ExactTier(store), *tiers)
        self.kv = kv
        self.kv_remote = kv_remote
        self._flights: dict[str, _Flight] = {}
        self.computations = 0  # L3 runs, for tests and metrics

    async def keyed(self, request: Request) -> Keyed:
        """Tokenize ``request`` and key it. Long texts are tokenized off the event loop
        (`BackendWorker.run_text`, beside any running generation); short ones inline, where
        tokenizing costs less than the hop to a thread (as an L0 read does). A chat request
        gets the stops of the model's chat format (`with_chat_stops`): ``Keyed.request``
        is the request as answered."""
        backend = self.worker.backend
        request = with_chat_stops(request, backend.chat_format.stops)

        def tokens() -> list[int]:
            if request.messages is not None:
                toks = backend.chat_tokens(request.messages)
            else:
                assert request.prompt is not None
                toks = backend.tokenize(request.prompt)
            backend.check_fits(len(toks), request.params.max_tokens)
            return toks

        if _text_size(request) <= INLINE_TOKENIZE_CHARS:
            toks = tokens()  # no more than the hop to a thread would cost
        else:
            toks = await self.worker.run_text(tokens)
        return Keyed(
            request, toks, input_sha256(self.model_hash, toks, request.params), self.model_hash
        )

    async def resolve(
        self, request: Request, on_token: TokenHook | None = None, keyed: Keyed | None = None
    ) -> Answer:
        """``on_token`` (live streaming) goes to the model only when this request computes
        (L3, leading its flight): called on the worker thread with each token as it is
        sampled; never for L0-L2 answers or a single-flight join. ``keyed``: the request
        already tokenized (`keyed`), so a caller that needs the key first tokenizes once."""
        t0 = time.perf_counter()
        keyed = keyed if keyed is not None else await self.keyed(request)
        for tier in self.tiers:
            answer = await tier.lookup(keyed)
            if answer is not None:
                answer.timings.lookup_ms = answer.timings.total_ms = (
                    time.perf_counter() - t0
                ) * 1000
                return answer
        self.store.record_miss()
        lookup_ms = (time.perf_counter() - t0) * 1000
        answer = await self._compute_once(keyed, on_token)
        answer.timings.lookup_ms = lookup_ms
        answer.timings.total_ms = (time.perf_counter() - t0) * 1000
        return answer

    async def _compute_once(self, keyed: Keyed, on_token: TokenHook | None = None) -> Answer:
        flight = self._flights.get(keyed.key)
        if flight is not None:  # identical request already running: wait for its answer
            await flight.done.wait()
            if flight.output is None:
                raise ComputationFailed(
                    "the identical request this one waited on failed"
                ) from flight.error
            return answer_from_output(flight.output, keyed, "L0", single_flight=True)
        flight = self._flights[keyed.key] = _Flight()
        try:
            answer = await self._compute(keyed, on_token)
            flight.output = Output(answer.tokens, answer.text, answer.finish_reason)
            return answer
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[keyed.key]
            flight.done.set()

    async def _compute(self, keyed: Keyed, on_token: TokenHook | None = None) -> Answer:
        """L3: run the model, then store the result (a failed write never loses the answer)."""
        params = keyed.request.params
        self.computations += 1
        cached_tokens = 0
        kv_peer: KvPeerDetails | None = None
        kv, remote = self.kv, self.kv_remote
        if kv is not None:  # resume from the longest stored prefix, store the new chunks
            fetched = await remote.prefetch(keyed) if remote is not None else None
            pg = await self.worker.run(lambda: kv.generate(keyed.tokens, params, on_token))
            gen, cached_tokens = pg.generation, pg.cached_tokens
            try:  # off the model thread: the next request can run meanwhile
                await trio.to_thread.run_sync(kv.store, pg.pending)
            except lmdb.Error as exc:
                log.warning("KV chunks for %s not stored: %s", keyed.key[:12], exc)
            if remote is not None:
                kv_peer = await remote.after_generate(keyed, pg, fetched)
        else:
            gen = await self.worker.generate(keyed.tokens, params, on_token)
        output = Output(tokens=gen.tokens, text=gen.text, finish_reason=gen.finish_reason)
        entry = own_entry(keyed, output, self.identity)
        try:
            await trio.to_thread.run_sync(self.store.put, entry)
        except StoreError as exc:
            log.warning("answer for %s not cached: %s", keyed.key[:12], exc)
        else:
            for tier in self.tiers:
                try:
                    await tier.on_stored(keyed, entry)
                except Exception:
                    log.exception("%s could not take %s", tier.level, keyed.key[:12])
        timings = Timings(
            prefill_ms=gen.prefill_ms,
            decode_ms=gen.decode_ms,
            prompt_tokens=gen.prompt_tokens,
            cached_prompt_tokens=cached_tokens,
            peer_prompt_tokens=kv_peer.tokens if kv_peer is not None else 0,
            completion_tokens=len(gen.tokens),
            local_tokens=len(gen.tokens),
        )
        return answer_from_output(output, keyed, "L3", timings=timings, kv_peer=kv_peer)
