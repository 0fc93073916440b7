"""The lookup ladder: L0 exact -> (L1 semantic) -> (L2 peers) -> L3 local inference.

Each rung is a `Tier`: it gets the keyed request and either answers or passes. L3 is not a
tier but the fallback that runs the model and stores the result, so that the next identical
request is an L0 hit. L1 and L2 plug in as tiers between them (see `Resolver.tiers`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import lmdb
import trio

from p2pcache.backend import BackendWorker, TokenHook
from p2pcache.identity import Identity
from p2pcache.keys import input_sha256
from p2pcache.resolver.types import Answer, KvPeerDetails, Level, Request, Timings
from p2pcache.store import Entry, Output, Store, StoreError

if TYPE_CHECKING:
    from p2pcache.kv import KvPrefixCache, PrefixGeneration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keyed:
    """A request after tokenization, with its exact key."""

    request: Request
    tokens: list[int]
    key: str
    model_hash: str


class KvRemote(Protocol):
    """KV prefix chunks from peers around an L3 run (`p2pcache.net.kv_tier.KvPeerTier`)."""

    async def prefetch(self, keyed: Keyed) -> Any:
        """Fetch the prompt's missing prefix chunks (stored locally); never raises."""

    async def after_generate(self, keyed: Keyed, pg: PrefixGeneration, fetched: Any) -> KvPeerDetails | None:
        """After the run: advertise what it stored; returns what the peer's chunks gave."""


class Tier(Protocol):
    """A rung of the ladder. It may also define ``async on_stored(keyed, entry)``, called
    after an L3 result is stored (L1 uses it to index the prompt's embedding)."""

    level: Level

    async def lookup(self, keyed: Keyed) -> Answer | None: ...


def answer_from_entry(entry: Entry, keyed: Keyed, level: Level) -> Answer:
    return Answer(
        text=entry.output.text,
        tokens=list(entry.output.tokens),
        finish_reason=entry.output.finish_reason,
        cache_level=level,
        input_sha256=keyed.key,
        model_hash=keyed.model_hash,
        timings=Timings(prompt_tokens=len(keyed.tokens), completion_tokens=len(entry.output.tokens)),
    )


class ExactTier:
    """L0: the stored `decoder_final` for this exact key."""

    level: Level = "L0"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def lookup(self, keyed: Keyed) -> Answer | None:
        entry = self.store.get(keyed.key)  # one LMDB read: microseconds, fine on the loop
        if entry is None or entry.cache_level != "decoder_final" or entry.model_hash != keyed.model_hash:
            return None
        self.store.record_hit(keyed.key)
        return answer_from_entry(entry, keyed, self.level)


class _Flight:
    """An in-progress computation that identical requests wait on (single-flight)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Answer | None = None
        self.error: BaseException | None = None


class Resolver:
    def __init__(
        self,
        store: Store,
        worker: BackendWorker,
        model_hash: str,
        identity: Identity,
        tiers: Sequence[Tier] = (),
    ) -> None:
        self.store = store
        self.worker = worker
        self.model_hash = model_hash
        self.identity = identity
        # L0 first, then whatever later layers register (semantic, peers).
        self.tiers: list[Tier] = [ExactTier(store), *tiers]
        self._flights: dict[str, _Flight] = {}
        self.computations = 0  # L3 runs, for tests and metrics
        # L3 resumes from stored KV prefixes when set (LocalNode sets it; p2pcache.kv).
        self.kv: KvPrefixCache | None = None
        # Before such an L3 run, fetch the prompt's missing prefix chunks from peers when set.
        self.kv_remote: KvRemote | None = None

    def keyed(self, request: Request) -> Keyed:
        backend = self.worker.backend
        if request.messages is not None:
            tokens = backend.chat_tokens(request.messages)
        else:
            assert request.prompt is not None
            tokens = backend.tokenize(request.prompt)
        backend.check_fits(len(tokens), request.params.max_tokens)
        return Keyed(request, tokens, input_sha256(self.model_hash, tokens, request.params), self.model_hash)

    async def resolve(
        self, request: Request, on_token: TokenHook | None = None, keyed: Keyed | None = None
    ) -> Answer:
        """``on_token`` (live streaming) goes to the model only when this request computes
        (L3, leading its flight): called on the worker thread with each token as it is
        sampled; never for L0-L2 answers or a single-flight join. ``keyed``: the request
        already tokenized (`keyed`), so a caller that needs the key first tokenizes once."""
        t0 = time.perf_counter()
        keyed = keyed if keyed is not None else self.keyed(request)
        for tier in self.tiers:
            answer = await tier.lookup(keyed)
            if answer is not None:
                answer.timings.lookup_ms = answer.timings.total_ms = (time.perf_counter() - t0) * 1000
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
            if flight.answer is None:
                raise RuntimeError("the identical request this one waited on failed") from flight.error
            answer = answer_from_entry_like(flight.answer, keyed)
            return answer
        flight = self._flights[keyed.key] = _Flight()
        try:
            flight.answer = await self._compute(keyed, on_token)
            return flight.answer
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
        entry = Entry(
            input_sha256=keyed.key,
            model_hash=keyed.model_hash,
            cache_level="decoder_final",
            output=Output(tokens=gen.tokens, text=gen.text, finish_reason=gen.finish_reason),
            params=params.to_dict(),
            privacy_flag=not keyed.request.share,
            producer=self.identity.peer_id,
            verified_by_us=True,
            prompt_tokens=len(keyed.tokens),
        )
        entry.signature = self.identity.sign(entry.signing_payload())
        try:
            await trio.to_thread.run_sync(self.store.put, entry)
        except StoreError as exc:
            log.warning("answer for %s not cached: %s", keyed.key[:12], exc)
        else:
            for tier in self.tiers:  # e.g. L1 indexes the new entry's prompt embedding
                on_stored = getattr(tier, "on_stored", None)
                if on_stored is not None:
                    try:
                        await on_stored(keyed, entry)
                    except Exception:
                        log.exception("%s could not index %s", tier.level, keyed.key[:12])
        return Answer(
            text=gen.text,
            tokens=gen.tokens,
            finish_reason=gen.finish_reason,
            cache_level="L3",
            input_sha256=keyed.key,
            model_hash=keyed.model_hash,
            timings=Timings(
                prefill_ms=gen.prefill_ms,
                decode_ms=gen.decode_ms,
                prompt_tokens=gen.prompt_tokens,
                cached_prompt_tokens=cached_tokens,
                peer_prompt_tokens=kv_peer.tokens if kv_peer is not None else 0,
                completion_tokens=len(gen.tokens),
            ),
            kv_peer=kv_peer,
        )


def answer_from_entry_like(answer: Answer, keyed: Keyed) -> Answer:
    """A waiter's copy of the answer computed for it: the same output, no compute of its own."""
    return Answer(
        text=answer.text,
        tokens=list(answer.tokens),
        finish_reason=answer.finish_reason,
        cache_level="L0",
        input_sha256=keyed.key,
        model_hash=keyed.model_hash,
        timings=Timings(prompt_tokens=len(keyed.tokens), completion_tokens=len(answer.tokens)),
        single_flight=True,
    )
