"""L2: answer from a peer that advertised the key: fetch, verify, store, answer.

Providers come from the gossip index (`Listings`), best first (`Ranking`: reputation, then
expected transfer time). The cost model skips providers whose expected fetch + verification
time is not below computing the answer here. Each failure is recorded (`Judge`) and the next
provider tried; a wrong answer never reaches the client: it is proven, published and the
next provider tried. When none is left the resolver falls back to L3.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from p2pcache.keys import SamplingParams
from p2pcache.net.ads import Provider
from p2pcache.net.config import TierConfig
from p2pcache.net.fetch import FetchError, FetchRequest, NotFound, entry_from_wire
from p2pcache.net.parts import Judge, Listings, PeerLink, Proof, Ranking, Verifier
from p2pcache.resolver import Answer, Keyed, Level, PeerDetails, answer_from_output
from p2pcache.store import Entry, Store, StoreError

if TYPE_CHECKING:
    from p2pcache.metrics import NodeMetrics

log = logging.getLogger(__name__)


class PeerTier:
    level: Level = "L2"

    def __init__(
        self,
        model_hash: str,
        store: Store,
        *,
        peers: PeerLink,
        listings: Listings,
        judge: Judge,
        ranking: Ranking,
        verifier: Verifier,
        metrics: NodeMetrics | None = None,
        config: TierConfig | None = None,
    ) -> None:
        self.model_hash = model_hash
        self.store = store
        self.peers = peers
        self.listings = listings
        self.judge = judge
        self.ranking = ranking
        self.verifier = verifier
        self.metrics = metrics
        self.config = config or TierConfig()
        self.stats = {
            "hits": 0,
            "misses": 0,
            "verified_failures": 0,
            "fetch_failures": 0,
            "skipped_by_cost": 0,
        }

    async def lookup(self, keyed: Keyed) -> Answer | None:
        if not self.peers.running or keyed.model_hash != self.model_hash:
            return None
        providers = self.ranking.ranked(self.listings.providers(keyed.key, "decoder_final"))
        if not providers:
            return None
        params = keyed.request.params
        for prov in providers[: self.config.max_providers]:
            if self.config.cost_model and not self.ranking.cost.decoder_final_pays(
                len(keyed.tokens), params.max_tokens, prov.size, self.judge.record(prov.peer_id)
            ):
                self.stats["skipped_by_cost"] += 1
                continue
            answer = await self._try(prov, keyed, params)
            if answer is not None:
                self.stats["hits"] += 1
                return answer
        self.stats["misses"] += 1
        return None

    async def _try(self, prov: Provider, keyed: Keyed, params: SamplingParams) -> Answer | None:
        pid = prov.peer_id
        t0 = time.perf_counter()
        req = FetchRequest(
            keyed.key, keyed.model_hash, "decoder_final", max_bytes=self.config.max_entry_bytes
        )
        try:
            got = await self.peers.fetch(pid, prov.addrs, req, self.config.fetch_timeout_s)
            entry = entry_from_wire(got.body)
        except FetchError as exc:
            if isinstance(exc, NotFound):
                self.listings.forget(keyed.key, pid)  # the ad was stale (evicted since)
            if self.judge.fetch_failed(pid, exc):
                self.stats["fetch_failures"] += 1
            return None
        fetch_ms = (time.perf_counter() - t0) * 1000
        if self.metrics is not None:
            self.metrics.bytes_fetched.inc(len(got.body))
        verdict = await self.verifier.verify(entry, keyed.key, keyed.tokens, params)
        if not verdict.ok:
            # The wrong answer never reaches the client: record, prove, try the next provider.
            self.stats["verified_failures"] += 1
            if self.metrics is not None:
                self.metrics.verification_failures.inc()
            log.warning(
                "L2: %s served a wrong answer for %s: %s", pid[:16], keyed.key[:12], verdict.reason
            )
            await self.judge.convict(pid, verdict.reason, Proof(got, keyed.tokens, params))
            return None
        if verdict.position < 0 and verdict.ms > 0:  # a full teacher-forced prefill ran
            self.ranking.cost.observe_prefill(
                len(keyed.tokens) + len(entry.output.tokens), verdict.ms / 1000
            )
        self.judge.fetched(pid, len(got.body), got.seconds, got.ttfb)
        entry.verified_by_us = True
        entry.privacy_flag = not keyed.request.share
        entry.prompt_tokens = len(keyed.tokens)
        try:
            await trio.to_thread.run_sync(self.store.put, entry)
        except StoreError as exc:
            log.warning("L2 answer for %s not cached: %s", keyed.key[:12], exc)
        else:
            if not entry.privacy_flag:
                self.listings.advertise(entry)
        return answer_from_output(
            entry.output,
            keyed,
            self.level,
            peer=PeerDetails(
                peer=pid,
                producer=entry.producer,
                verified=True,
                fetch_ms=round(fetch_ms, 2),
                verify_ms=round(verdict.ms, 2),
                bytes=len(got.body),
            ),
        )

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """After L3 stored an entry: advertise it unless private."""
        if not entry.privacy_flag:
            self.listings.advertise(entry)
