"""KV prefixes over the network: advertise shareable prefix chunks, fetch the chunks a prompt
lacks from a trusted peer, spot-check them, store them so L3 resumes from them.

- **Ads.** Every shared chunk (`KvChunkStore.mark_shared`) is the tip of a prefix a peer can
  fetch: ``(kv_prefix, chunk hash, bytes of chunks 0..tip, kv_config digest)``. Only a shared
  request marks its prompt's chunks; chunks of private requests are never advertised or served.
- **Fetch.** Before L3 (`Resolver._compute` calls `prefetch`), the prompt's chain hashes are
  computed here; the longest one some peer advertised beyond our local prefix is the tip. The
  request names the tip, the chunk range we lack and those chunks' hashes; the body is
  ``n x 32-byte hash || n x payload`` (chain order), so the server's signature over the body's
  sha256 covers what it claims the chunks are. Only peers scoring above `min_score` are asked,
  and only when `CostModel.kv_prefix_pays` (fetch + restore beats prefilling those tokens here).
- **Spot-check.** A KV state cannot be verified cheaply, so a fraction (`spot_check_rate`) of
  fetches is recomputed (`KvPrefixCache.spot_check`): the next-token logits after the restored
  prefix must match a cold prefill's within `spot_check_tolerance`. A mismatch drops the
  chunks, records a verified failure for the peer (it may get banned), and the request
  prefills locally: the client still gets a correct answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pcache.backend import BackendWorker
from p2pcache.kv import KvPrefixCache, PrefixGeneration
from p2pcache.kv.chain import chunk_hashes
from p2pcache.kv.chunk_store import NewChunk
from p2pcache.net.ads import AdEntry, Provider
from p2pcache.net.config import KvNetConfig
from p2pcache.net.fetch import MAX_KV_CHUNKS, BadResponse, FetchError, FetchRequest, NotFound
from p2pcache.net.parts import Judge, Listings, PeerLink, Ranking, SpotChecker
from p2pcache.resolver import Keyed, KvPeerDetails

if TYPE_CHECKING:
    from p2pcache.metrics import NodeMetrics

log = logging.getLogger(__name__)

HASH_BYTES = 32


def encode_body(hashes: Sequence[bytes], payloads: Sequence[bytes]) -> bytes:
    return b"".join([*hashes, *payloads])


def decode_body(
    body: bytes | bytearray, hashes: Sequence[bytes], chunk_bytes: int
) -> list[memoryview]:
    """The payloads of a kv_prefix body, checked against the hashes we asked for."""
    n = len(hashes)
    if len(body) != n * (HASH_BYTES + chunk_bytes):
        raise BadResponse(f"kv body of {len(body)} bytes, expected {n} chunks of {chunk_bytes}")
    mv = memoryview(body)
    for i, h in enumerate(hashes):
        if mv[i * HASH_BYTES : (i + 1) * HASH_BYTES] != h:
            raise BadResponse(f"kv body names chunk {i} differently from the request")
    base = n * HASH_BYTES
    return [mv[base + i * chunk_bytes : base + (i + 1) * chunk_bytes] for i in range(n)]


class KvSource:
    """Serves shared KV chunks (the fetch server's `ValueSource` for level ``kv_prefix``)."""

    def __init__(self, kv: KvPrefixCache, model_hash: str) -> None:
        self.kv = kv
        self.model_hash = model_hash

    def value(self, req: FetchRequest) -> bytes | None:
        if (
            req.level != "kv_prefix"
            or req.model_hash != self.model_hash
            or not req.chunks
            or req.range is None
        ):
            return None
        first, end = req.range
        if end - first != len(req.chunks) or req.chunks[-1].hex() != req.key:
            return None
        payloads = self.kv.chunks.shared_payloads(req.chunks, self.kv.chunk_bytes)
        return None if payloads is None else encode_body(req.chunks, payloads)


def kv_ads(kv: KvPrefixCache, tips: Iterable[tuple[bytes, int]]) -> list[AdEntry]:
    """Adverts of shared chunks ``(hash, depth)``: each the tip of a prefix of depth + 1 chunks."""
    assert kv.config is not None
    digest = kv.config.digest().hex()
    return [
        AdEntry("kv_prefix", h.hex(), (depth + 1) * kv.chunk_bytes, digest) for h, depth in tips
    ]


class KvInventory:
    """Shared chunk tips, for the directory's periodic re-advertisement (`Inventory`)."""

    def __init__(self, kv: KvPrefixCache, limit: int = KvNetConfig.advertise_max) -> None:
        self.kv = kv
        self.limit = limit

    def inventory(self) -> list[AdEntry]:
        return kv_ads(self.kv, self.kv.chunks.shared_tips(self.limit))


class ModelSpotChecker:
    """`KvPrefixCache.spot_check` on the node's model, run on its worker thread."""

    def __init__(self, worker: BackendWorker, kv: KvPrefixCache) -> None:
        self.worker = worker
        self.kv = kv

    async def spot_check(self, tokens: Sequence[int], n_chunks: int) -> float | None:
        return await self.worker.run(lambda: self.kv.spot_check(tokens, n_chunks))


@dataclass
class KvFetched:
    """Chunks ``first..end-1`` of a prompt's chain, fetched from ``peer`` and stored."""

    peer: str
    first: int
    end: int
    hashes: list[bytes]
    nbytes: int
    fetch_ms: float
    spot_checked: bool = False
    spot_check_diff: float | None = None
    dropped: bool = False  # failed the spot-check: not used


class KvPeerTier:
    """The requester side (`prefetch`, `after_generate`) and the advertiser of new chunks."""

    def __init__(
        self,
        kv: KvPrefixCache,
        model_hash: str,
        *,
        peers: PeerLink,
        listings: Listings,
        judge: Judge,
        ranking: Ranking,
        checker: SpotChecker,
        metrics: NodeMetrics | None = None,
        config: KvNetConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.kv = kv
        self.model_hash = model_hash
        self.peers = peers
        self.listings = listings
        self.judge = judge
        self.ranking = ranking
        self.checker = checker
        self.metrics = metrics
        self.config = config or KvNetConfig()
        self.rng = rng or random.Random()
        self.stats = {
            "fetches": 0,
            "chunks_fetched": 0,
            "bytes_fetched": 0,
            "fetch_failures": 0,
            "skipped_by_cost": 0,
            "skipped_by_score": 0,
            "spot_checks": 0,
            "spot_check_failures": 0,
            "chunks_advertised": 0,
        }

    # -- requester ------------------------------------------------------------------------
    def _eligible(self, providers: list[Provider]) -> list[Provider]:
        out = []
        for p in self.ranking.ranked(providers):  # minus ourselves and banned peers, best first
            if self.judge.record(p.peer_id).score() > self.config.min_score:
                out.append(p)
            else:
                self.stats["skipped_by_score"] += 1
        return out

    async def prefetch(self, keyed: Keyed) -> KvFetched | None:
        """Fetch (and maybe spot-check) the chunks of the longest advertised prefix of this
        prompt that we lack. Never raises: any failure means a local prefill."""
        try:
            return await self._prefetch(keyed)
        except Exception:
            log.exception("KV prefix fetch for %s failed; prefilling locally", keyed.key[:12])
            return None

    async def _prefetch(self, keyed: Keyed) -> KvFetched | None:
        kv, cfg = self.kv, self.config
        if (
            not cfg.enabled
            or not self.peers.running
            or kv.config is None
            or keyed.model_hash != self.model_hash
        ):
            return None
        c = kv.policy.chunk_tokens
        # Chunks a restore may use (it leaves at least one prompt token to evaluate).
        hashes = chunk_hashes(kv.config, keyed.tokens, (len(keyed.tokens) - 1) // c)
        if not hashes:
            return None
        present = await trio.to_thread.run_sync(kv.chunks.present, hashes)
        have = next((i for i, p in enumerate(present) if not p), len(hashes))
        tip, providers = -1, []
        for i in range(len(hashes) - 1, have - 1, -1):  # the longest advertised prefix
            if found := self.listings.providers(hashes[i].hex(), "kv_prefix"):
                tip, providers = i, self._eligible(found)
                break
        if tip < 0:
            return None
        first, end = max(have, tip + 1 - MAX_KV_CHUNKS), tip + 1
        if first > have:  # more than one request can carry: leave it to local prefill
            return None
        n = end - first
        for prov in providers[: cfg.max_providers]:
            rec = self.judge.record(prov.peer_id)
            if cfg.cost_model and not self.ranking.cost.kv_prefix_pays(
                n * kv.chunk_bytes, n * c, rec
            ):
                self.stats["skipped_by_cost"] += 1
                continue
            got = await self._fetch(prov, hashes, first, end)
            if got is None:
                continue
            if cfg.spot_check_rate > 0 and self.rng.random() < cfg.spot_check_rate:
                await self._spot_check(got, keyed.tokens)
            if not got.dropped:
                self.judge.fetched(prov.peer_id, got.nbytes, got.fetch_ms / 1000)
            return got
        return None

    async def _fetch(
        self, prov: Provider, hashes: list[bytes], first: int, end: int
    ) -> KvFetched | None:
        kv = self.kv
        pid, want = prov.peer_id, hashes[first:end]
        req = FetchRequest(
            want[-1].hex(),
            self.model_hash,
            "kv_prefix",
            (first, end),
            max_bytes=min(self.config.max_fetch_bytes, len(want) * (HASH_BYTES + kv.chunk_bytes)),
            chunks=tuple(want),
        )
        t0 = time.perf_counter()
        try:
            got = await self.peers.fetch(pid, prov.addrs, req, self.config.fetch_timeout_s)
            payloads = decode_body(got.body, want, kv.chunk_bytes)
        except FetchError as exc:
            if isinstance(exc, NotFound):
                self.listings.forget(req.key, pid, "kv_prefix")  # evicted or no longer shared
            if self.judge.fetch_failed(pid, exc):
                self.stats["fetch_failures"] += 1
            return None
        fetch_ms = (time.perf_counter() - t0) * 1000
        c = kv.policy.chunk_tokens
        chunks = [
            NewChunk(h, first + i, c, p)
            for i, (h, p) in enumerate(zip(want, payloads, strict=True))
        ]
        await trio.to_thread.run_sync(kv.chunks.put_many, chunks, 0)
        self.stats["fetches"] += 1
        self.stats["chunks_fetched"] += len(want)
        self.stats["bytes_fetched"] += len(got.body)
        if self.metrics is not None:
            self.metrics.bytes_fetched.inc(len(got.body))
        log.info(
            "KV: %d chunks (%d bytes) of %s from %s in %.1f ms",
            len(want),
            len(got.body),
            req.key[:12],
            pid[:16],
            fetch_ms,
        )
        return KvFetched(pid, first, end, list(want), len(got.body), fetch_ms)

    async def _spot_check(self, got: KvFetched, tokens: list[int]) -> None:
        diff = await self.checker.spot_check(tokens, got.end)
        if diff is None:
            return
        self.stats["spot_checks"] += 1
        got.spot_checked, got.spot_check_diff = True, diff
        if diff <= self.config.spot_check_tolerance:
            return
        # A verified failure: our own prefill disagrees with the peer's chunks.
        got.dropped = True
        self.stats["spot_check_failures"] += 1
        if self.metrics is not None:
            self.metrics.verification_failures.inc()
        await trio.to_thread.run_sync(self.kv.chunks.drop, got.hashes)
        reason = (
            f"kv_prefix chunks {got.first}..{got.end - 1} failed the spot-check "
            f"(logit diff {got.spot_check_diff:.3g})"
        )
        log.warning("KV: %s served bad chunks: %s", got.peer[:16], reason)
        await self.judge.convict(got.peer, reason)

    async def after_generate(
        self, keyed: Keyed, pg: PrefixGeneration, got: KvFetched | None
    ) -> KvPeerDetails | None:
        """After L3 stored its chunks: learn our prefill speed, mark a shared request's chunks
        shareable and advertise the new ones. Returns what the peer's chunks gave, if any."""
        kv = self.kv
        gen = pg.generation
        self.ranking.cost.observe_prefill(
            gen.prompt_tokens - pg.cached_tokens, gen.prefill_ms / 1000
        )
        details: KvPeerDetails | None = None
        c = kv.policy.chunk_tokens
        if got is not None:
            used = 0 if got.dropped else max(0, min(pg.cached_tokens, got.end * c) - got.first * c)
            details = KvPeerDetails(
                peer=got.peer,
                tokens=used,
                chunks=got.end - got.first,
                bytes=got.nbytes,
                fetch_ms=round(got.fetch_ms, 2),
                spot_checked=got.spot_checked,
                rejected=got.dropped,
                spot_check_diff=round(got.spot_check_diff, 4)
                if got.spot_check_diff is not None
                else None,
            )
        if keyed.request.share and kv.config is not None and self.peers.running:
            limit = kv.policy.max_store_tokens or kv.backend.config.n_ctx
            hashes = chunk_hashes(kv.config, keyed.tokens, min(len(keyed.tokens), limit) // c)
            try:
                new = set(await trio.to_thread.run_sync(kv.chunks.mark_shared, hashes))
            except Exception as exc:  # an LMDB error: the chunks simply stay private
                log.warning("KV chunks of %s not marked shared: %s", keyed.key[:12], exc)
                new = set()
            ads = kv_ads(kv, [(h, d) for d, h in enumerate(hashes) if h in new])
            if ads:
                self.listings.advertise_ads(ads)
                self.stats["chunks_advertised"] += len(ads)
        return details
