"""L2: answer from a peer that advertised the key: fetch, walk as a draft, store, answer.

Providers come from the gossip index (`Listings`), best first (`Ranking`: reputation, then
expected transfer time). The cost model skips providers whose expected fetch + verification
time is not below computing the answer here. A fetched answer is walked by the local model
(`p2pcache.net.verify`): accepted whole, it is served and stored as the peer's; diverging at
token k, the node keeps the k accepted tokens and generates the rest, and that answer (its
own, under its own signature) is served and stored. A lie never reaches the client: it is
proven and published (`Judge.convict`); a near-tie is counted (`Judge.near_tie`). An entry
refused before the model runs (malformed, badly signed) and failed fetches pass to the next
provider; when none is left the resolver falls back to L3.

The whole attempt has one deadline: what generating the answer here would take
(`CostModel.local_s`, within ``TierConfig.min_deadline_s`` .. ``max_deadline_s``). Every dial
and fetch of every provider shares it (an advert listing addresses that accept and never speak
costs the deadline, not a dial timeout per address); past it no further provider is tried and
the request is answered from L3. A fetched answer is still verified after the deadline: that
cost was priced in by the cost model before the fetch.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.net.ads import Provider
from p2pcache.net.config import TierConfig
from p2pcache.net.fetch import FetchError, FetchRequest, NotFound, entry_from_wire
from p2pcache.net.parts import Judge, Listings, PeerLink, Proof, Ranking, Verifier
from p2pcache.net.verify import Verdict
from p2pcache.resolver import Answer, Keyed, Level, PeerDetails, Timings, answer_from_output
from p2pcache.resolver.types import own_entry
from p2pcache.store import Entry, Output, Store, StoreError

if TYPE_CHECKING:
    from p2pcache.metrics import NodeMetrics

log = logging.getLogger(__name__)


class PeerTier:
    level: Level = "L2"

    def __init__(
        self,
        model_hash: str,
        store: Store,
        identity: Identity,
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
        self.identity = identity  # signs the answers this node finishes after a divergence
        self.peers = peers
        self.listings = listings
        self.judge = judge
        self.ranking = ranking
        self.verifier = verifier
        self.metrics = metrics
        self.config = config or TierConfig()
        self.stats: dict[str, float] = {
            "hits": 0,
            "misses": 0,
            "verified_failures": 0,
            "fetch_failures": 0,
            "skipped_by_cost": 0,
            "deadline_expired": 0,  # lookups that ran out of time before every provider
            "deadline_s": 0.0,  # the last lookup's budget
        }

    async def lookup(self, keyed: Keyed) -> Answer | None:
        if not self.peers.running or keyed.model_hash != self.model_hash:
            return None
        providers = self.ranking.ranked(self.listings.providers(keyed.key, "decoder_final"))
        if not providers:
            return None
        params = keyed.request.params
        budget = self.deadline_s(len(keyed.tokens), params.max_tokens)
        self.stats["deadline_s"] = round(budget, 3)
        deadline = trio.current_time() + budget
        for prov in providers[: self.config.max_providers]:
            if self.config.cost_model and not self.ranking.cost.decoder_final_pays(
                len(keyed.tokens), params.max_tokens, prov.size, self.judge.record(prov.peer_id)
            ):
                self.stats["skipped_by_cost"] += 1
                continue
            left = deadline - trio.current_time()
            if left <= 0:
                self.stats["deadline_expired"] += 1
                log.info("L2 for %s: out of time after %.2f s; L3 answers", keyed.key[:12], budget)
                break
            answer = await self._try(prov, keyed, params, left)
            if answer is not None:
                self.stats["hits"] += 1
                return answer
        self.stats["misses"] += 1
        return None

    def deadline_s(self, prompt_tokens: int, max_out_tokens: int) -> float:
        """The L2 attempt's whole budget: the expected cost of generating locally."""
        local = self.ranking.cost.local_s(prompt_tokens, max_out_tokens)
        return min(self.config.max_deadline_s, max(self.config.min_deadline_s, local))

    async def _try(
        self, prov: Provider, keyed: Keyed, params: SamplingParams, left_s: float
    ) -> Answer | None:
        pid = prov.peer_id
        t0 = time.perf_counter()
        req = FetchRequest(
            keyed.key, keyed.model_hash, "decoder_final", max_bytes=self.config.max_entry_bytes
        )
        try:
            timeout_s = min(self.config.fetch_timeout_s, left_s)
            got = await self.peers.fetch(pid, prov.addrs, req, timeout_s)
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
        producer = entry.producer
        verdict = await self.verifier.verify(entry, keyed.key, keyed.tokens, params)
        self._count(verdict)
        outcome = verdict.outcome
        draft_tokens = verdict.position + 1 if verdict.position >= 0 else len(entry.output.tokens)
        if verdict.blamed:
            # The wrong answer never reaches the client: record, prove, publish.
            self.stats["verified_failures"] += 1
            log.warning(
                "L2: %s served a wrong answer for %s: %s", pid[:16], keyed.key[:12], verdict.reason
            )
            await self.judge.convict(pid, verdict.reason, Proof(got, keyed.tokens, params))
        elif verdict.kind == "near_tie":
            log.info("L2: %s diverged within float noise: %s", pid[:16], verdict.reason)
            if params.greedy:  # sampled answers diverge too often honestly to count
                self.judge.near_tie(pid, draft_tokens)
        else:
            self.judge.fetched(pid, len(got.body), got.seconds, got.ttfb, draft_tokens)
        if outcome is None or outcome.generation is None:
            return None  # refused before the model ran: try the next provider
        if verdict.ok:
            # One teacher-forced pass over prompt + answer: what the cost model learns from.
            self.ranking.cost.observe_prefill(
                len(keyed.tokens) + outcome.accepted, outcome.walk_ms / 1000
            )
            entry.verified_by_us = True
            entry.privacy_flag = not keyed.request.share
            entry.prompt_tokens = len(keyed.tokens)
        else:  # the answer is ours from the divergence on: store it under our signature
            gen = outcome.generation
            entry = own_entry(keyed, Output(gen.tokens, gen.text, gen.finish_reason), self.identity)
        await self._store(keyed, entry)
        level: Level = self.level if outcome.accepted > 0 else "L3"
        gen = outcome.generation
        timings = Timings(
            prefill_ms=gen.prefill_ms,
            decode_ms=gen.decode_ms,
            prompt_tokens=len(keyed.tokens),
            completion_tokens=len(gen.tokens),
            accepted_tokens=outcome.accepted,
            local_tokens=outcome.local_tokens,
        )
        return answer_from_output(
            entry.output,
            keyed,
            level,
            timings=timings,
            peer=PeerDetails(
                peer=pid,
                producer=producer,
                verified=True,
                fetch_ms=round(fetch_ms, 2),
                verify_ms=round(outcome.walk_ms, 2),
                bytes=len(got.body),
            ),
        )

    def _count(self, verdict: Verdict) -> None:
        if self.metrics is None:
            return
        self.metrics.draft_outcomes.labels(verdict.kind).inc()
        if verdict.outcome is not None:
            self.metrics.draft_accepted.observe(verdict.outcome.accepted)
        if verdict.blamed:
            self.metrics.verification_failures.inc()

    async def _store(self, keyed: Keyed, entry: Entry) -> None:
        try:
            await trio.to_thread.run_sync(self.store.put, entry)
        except StoreError as exc:
            log.warning("L2 answer for %s not cached: %s", keyed.key[:12], exc)
        else:
            if not entry.privacy_flag:
                await self.listings.announce(entry)

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """After L3 stored an entry: announce it now unless private, before the answer is
        returned, so a peer asked right after finds the advert (L2, not a second L3)."""
        if not entry.privacy_flag:
            await self.listings.announce(entry)
