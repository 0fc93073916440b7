"""L2: answer from a peer that advertised the key: fetch, verify, store, answer.

Providers come from the gossip index, minus banned peers, ordered by reputation score
(bucketed to 0.1, so a small difference does not beat a much faster peer) and then by the
expected transfer time (observed latency + size / observed bandwidth). A `CostModel` skips
providers whose expected fetch + verification time is not below computing the answer here
(own measured prefill speed vs the peer's measured latency/bandwidth and the entry size).
Each failure is recorded and the next provider tried; when none is left the resolver falls
back to L3.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pcache.keys import SamplingParams
from p2pcache.net.ads import Provider
from p2pcache.net.evidence import make_evidence
from p2pcache.net.fetch import (BadResponse, Busy, FetchError, FetchRequest, FetchTimeout, NotFound,
                                entry_from_wire, fetch)
from p2pcache.net.reputation import PeerRecord
from p2pcache.net.verify import BackendScorer, VerifyConfig, verify_decoder_final
from p2pcache.resolver.ladder import Keyed, answer_from_entry
from p2pcache.resolver.types import Answer, Level, PeerDetails
from p2pcache.store import Entry, StoreError

if TYPE_CHECKING:
    from p2pcache.net.service import NetService

log = logging.getLogger(__name__)


DEFAULT_LATENCY_S = 0.01  # a peer we have not measured yet (optimistic: the first fetch measures it)
DEFAULT_BANDWIDTH = 50e6  # bytes/s, idem


@dataclass
class CostModel:
    """Fetch or recompute? Compares the expected time to get a value from a peer (latency +
    bytes / bandwidth, from that peer's measured history) plus checking it, against computing
    it here. Local speeds start at the 2-core CPU figures of DESIGN.md and follow what this
    node measures: every verification is one prefill of prompt + output, so it measures the
    prefill speed (decode speed stays at the configured figure)."""

    prefill_tps: float = 700.0
    decode_tps: float = 80.0
    restore_bps: float = 1.7e9  # KV state restore (llama_state_seq_set_data), DESIGN.md

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 8 and seconds > 0:
            self.prefill_tps = _ewma(self.prefill_tps, tokens / seconds)

    @staticmethod
    def fetch_s(nbytes: int, rec: PeerRecord) -> float:
        latency = rec.latency_ms / 1000 if rec.latency_ms else DEFAULT_LATENCY_S
        return latency + nbytes / (rec.bandwidth or DEFAULT_BANDWIDTH)

    def decoder_final_pays(self, prompt_tokens: int, max_out_tokens: int, nbytes: int, rec: PeerRecord) -> bool:
        """Fetch + verify (one prefill of prompt + output) vs prefill + decode here."""
        out = max(1, min(max_out_tokens, nbytes // 4))  # a token costs >= ~4 bytes on the wire
        fetch_and_verify = self.fetch_s(nbytes, rec) + (prompt_tokens + out) / self.prefill_tps
        compute = prompt_tokens / self.prefill_tps + out / self.decode_tps
        return fetch_and_verify < compute

    def kv_prefix_pays(self, state_bytes: int, n_tokens: int, rec: PeerRecord) -> bool:
        """A KV state: fetch + restore vs prefilling its tokens here (DESIGN.md's break-even)."""
        return self.fetch_s(state_bytes, rec) + state_bytes / self.restore_bps < n_tokens / self.prefill_tps

    def snapshot(self) -> dict[str, float]:
        return {"prefill_tps": round(self.prefill_tps, 1), "decode_tps": round(self.decode_tps, 1)}


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return (1 - alpha) * old + alpha * new


@dataclass(frozen=True)
class TierConfig:
    fetch_timeout_s: float = 10.0
    max_providers: int = 4  # tried per lookup
    max_entry_bytes: int = 4 * 1024 * 1024
    verify: VerifyConfig = VerifyConfig()
    cost_model: bool = True  # False: always try peers (benchmarks of the fetch path)


class PeerTier:
    level: Level = "L2"

    def __init__(self, service: NetService, config: TierConfig | None = None) -> None:
        self.service = service
        self.config = config or TierConfig()
        self.cost = CostModel()
        self.stats = {"hits": 0, "misses": 0, "verified_failures": 0, "fetch_failures": 0, "skipped_by_cost": 0}

    def ranked(self, providers: list[Provider]) -> list[Provider]:
        rep = self.service.rep
        me = self.service.identity.peer_id
        out = []
        for p in providers:
            if p.peer_id == me:
                continue
            rec = rep.get(p.peer_id)
            if rec.banned():
                continue
            # Score bucketed to 0.1 and expected time to the millisecond: a few bytes or a slightly
            # better record do not beat a clearly faster peer; ties go by peer id (stable).
            out.append((-round(rec.score(), 1), round(CostModel.fetch_s(p.size, rec), 3), p.peer_id, p))
        out.sort(key=lambda t: t[:3])
        return [t[3] for t in out]

    async def lookup(self, keyed: Keyed) -> Answer | None:
        svc = self.service
        if not svc.running or keyed.model_hash != svc.model_hash:
            return None
        providers = self.ranked(svc.index.providers(keyed.key, "decoder_final"))
        if not providers:
            return None
        params = keyed.request.params
        for prov in providers[: self.config.max_providers]:
            if self.config.cost_model and not self.cost.decoder_final_pays(
                    len(keyed.tokens), params.max_tokens, prov.size, svc.rep.get(prov.peer_id)):
                self.stats["skipped_by_cost"] += 1
                continue
            entry = await self._try(prov, keyed, params)
            if entry is not None:
                self.stats["hits"] += 1
                return entry
        self.stats["misses"] += 1
        return None

    async def _try(self, prov: Provider, keyed: Keyed, params: SamplingParams) -> Answer | None:
        svc = self.service
        rep = svc.rep
        pid = prov.peer_id
        t0 = time.perf_counter()
        req = FetchRequest(keyed.key, keyed.model_hash, "decoder_final", max_bytes=self.config.max_entry_bytes)
        try:
            await svc.ensure_connected(pid, prov.addrs, self.config.fetch_timeout_s)
            got = await fetch(svc.host, pid, req, timeout_s=self.config.fetch_timeout_s)
            entry = entry_from_wire(got.body)
        except NotFound:
            svc.index.forget(keyed.key, pid)  # the ad was stale (evicted since): no penalty
            return None
        except Busy:
            return None
        except FetchTimeout as exc:
            log.info("L2: %s", exc)
            self.stats["fetch_failures"] += 1
            rep.record_timeout(pid)
            return None
        except BadResponse as exc:
            log.warning("L2: bad response from %s: %s", pid[:16], exc)
            self.stats["fetch_failures"] += 1
            rep.record_bad(pid, str(exc))
            return None
        except FetchError as exc:  # unreachable, vanished mid-transfer, reset
            log.info("L2: fetch from %s failed: %s", pid[:16], exc)
            self.stats["fetch_failures"] += 1
            rep.record_timeout(pid)
            return None
        fetch_ms = (time.perf_counter() - t0) * 1000
        if svc.metrics is not None:
            svc.metrics.bytes_fetched.inc(len(got.body))
        scorer = BackendScorer(svc.worker.backend)
        verdict = await svc.worker.run(lambda: verify_decoder_final(
            scorer, entry, keyed.key, keyed.model_hash, keyed.tokens, params, self.config.verify))
        if not verdict.ok:
            # The wrong answer never reaches the client: record, prove, try the next provider.
            self.stats["verified_failures"] += 1
            if svc.metrics is not None:
                svc.metrics.verification_failures.inc()
            log.warning("L2: %s served a wrong answer for %s: %s", pid[:16], keyed.key[:12], verdict.reason)
            ev = make_evidence(svc.identity, got.header, got.body, keyed.tokens, params, verdict.reason)
            data = ev.encode()
            rec = rep.record_verified_failure(pid, data, verdict.reason)
            await svc.publish_evidence(data)
            if rec.banned():
                svc.on_banned(pid)
            return None
        if verdict.position < 0 and verdict.ms > 0:  # a full teacher-forced prefill ran
            self.cost.observe_prefill(len(keyed.tokens) + len(entry.output.tokens), verdict.ms / 1000)
        rep.record_success(pid, len(got.body), got.seconds, got.ttfb)
        entry.verified_by_us = True
        entry.privacy_flag = not keyed.request.share
        entry.prompt_tokens = len(keyed.tokens)
        try:
            await trio.to_thread.run_sync(svc.store.put, entry)
        except StoreError as exc:
            log.warning("L2 answer for %s not cached: %s", keyed.key[:12], exc)
        else:
            if not entry.privacy_flag:
                svc.advertise(entry)
        answer = answer_from_entry(entry, keyed, self.level)
        answer.peer = PeerDetails(peer=pid, producer=entry.producer, verified=True,
                                  fetch_ms=round(fetch_ms, 2), verify_ms=round(verdict.ms, 2),
                                  bytes=len(got.body))
        return answer

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """Resolver hook after L3 stored an entry: advertise it unless private."""
        if not entry.privacy_flag:
            self.service.advertise(entry)
