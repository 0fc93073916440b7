"""L2: answer from a peer that advertised the key: fetch, verify, store, answer.

Providers come from the gossip index, minus banned peers, ordered by reputation score
(bucketed to 0.1, so a small difference does not beat a much faster peer) and then by the
expected transfer time (observed latency + size / observed bandwidth). Each failure is
recorded and the next provider tried; when none is left the resolver falls back to L3.
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
from p2pcache.net.verify import BackendScorer, VerifyConfig, verify_decoder_final
from p2pcache.resolver.ladder import Keyed, answer_from_entry
from p2pcache.resolver.types import Answer, Level
from p2pcache.store import Entry, StoreError

if TYPE_CHECKING:
    from p2pcache.net.service import NetService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierConfig:
    fetch_timeout_s: float = 10.0
    max_providers: int = 4  # tried per lookup
    max_entry_bytes: int = 4 * 1024 * 1024
    verify: VerifyConfig = VerifyConfig()


class PeerTier:
    level: Level = "L2"

    def __init__(self, service: NetService, config: TierConfig | None = None) -> None:
        self.service = service
        self.config = config or TierConfig()
        self.stats = {"hits": 0, "misses": 0, "verified_failures": 0, "fetch_failures": 0}

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
            est = (rec.latency_ms / 1000 if rec.latency_ms else 0.05) + (
                p.size / rec.bandwidth if rec.bandwidth else p.size / 50e6)
            out.append((-round(rec.score(), 1), est, p.peer_id, p))
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
            return None  # the ad was stale (evicted since): no penalty
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
        scorer = BackendScorer(svc.worker.backend)
        verdict = await svc.worker.run(lambda: verify_decoder_final(
            scorer, entry, keyed.key, keyed.model_hash, keyed.tokens, params, self.config.verify))
        if not verdict.ok:
            self.stats["verified_failures"] += 1
            log.warning("L2: %s served a wrong answer for %s: %s", pid[:16], keyed.key[:12], verdict.reason)
            ev = make_evidence(svc.identity, got.header, got.body, keyed.tokens, params, verdict.reason)
            data = ev.encode()
            rep.record_verified_failure(pid, data, verdict.reason)
            await svc.publish_evidence(data)
            return None
        rep.record_success(pid, len(got.body), got.seconds)
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
        answer.details = {"peer": pid, "producer": entry.producer, "fetch_ms": round(fetch_ms, 2),
                          "verify_ms": round(verdict.ms, 2), "bytes": len(got.body)}
        return answer

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """Resolver hook after L3 stored an entry: advertise it unless private."""
        if not entry.privacy_flag:
            self.service.advertise(entry)
