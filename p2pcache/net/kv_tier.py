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
  fetches is recomputed: the next-token logits after the restored prefix must match a cold
  prefill's within `spot_check_tolerance`. A mismatch drops the chunks, records a verified
  failure for the peer (it may get banned), and the request prefills locally: the client still
  gets a correct answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
import trio

from p2pcache.kv.chain import chunk_hashes
from p2pcache.kv.chunk_store import NewChunk
from p2pcache.net.ads import AdEntry, Provider
from p2pcache.net.fetch import (MAX_KV_CHUNKS, BadResponse, Busy, FetchError, FetchRequest, FetchTimeout,
                                NotFound, fetch)

if TYPE_CHECKING:
    from p2pcache.kv import KvPrefixCache, PrefixGeneration
    from p2pcache.net.service import NetService
    from p2pcache.resolver.ladder import Keyed
    from p2pcache.resolver.types import KvPeerDetails

log = logging.getLogger(__name__)

HASH_BYTES = 32


@dataclass(frozen=True)
class KvNetConfig:
    enabled: bool = True
    min_score: float = 0.4  # a new peer scores 0.5; one unexplained timeout takes it to 0.33
    spot_check_rate: float = 0.1
    spot_check_tolerance: float = 0.5  # max |logit difference| (same hardware: 0; bad chunks: >> 1)
    max_fetch_bytes: int = 256 * 1024 * 1024
    max_providers: int = 3
    advertise_max: int = 2048  # shared chunk tips per inventory round
    cost_model: bool = True


def encode_body(hashes: Sequence[bytes], payloads: Sequence[bytes]) -> bytes:
    return b"".join([*hashes, *payloads])


def decode_body(body: bytes | bytearray, hashes: Sequence[bytes], chunk_bytes: int) -> list[memoryview]:
    """The payloads of a kv_prefix body, checked against the hashes we asked for."""
    n = len(hashes)
    if len(body) != n * (HASH_BYTES + chunk_bytes):
        raise BadResponse(f"kv body of {len(body)} bytes, expected {n} chunks of {chunk_bytes}")
    mv = memoryview(body)
    for i, h in enumerate(hashes):
        if mv[i * HASH_BYTES:(i + 1) * HASH_BYTES] != h:
            raise BadResponse(f"kv body names chunk {i} differently from the request")
    base = n * HASH_BYTES
    return [mv[base + i * chunk_bytes: base + (i + 1) * chunk_bytes] for i in range(n)]


class KvSource:
    """Serves shared KV chunks (the fetch server's `ValueSource` for level ``kv_prefix``)."""

    def __init__(self, kv: KvPrefixCache, model_hash: str) -> None:
        self.kv = kv
        self.model_hash = model_hash

    def value(self, req: FetchRequest) -> bytes | None:
        if req.level != "kv_prefix" or req.model_hash != self.model_hash or not req.chunks or req.range is None:
            return None
        first, end = req.range
        if end - first != len(req.chunks) or req.chunks[-1].hex() != req.key:
            return None
        payloads = self.kv.chunks.shared_payloads(req.chunks, self.kv.chunk_bytes)
        return None if payloads is None else encode_body(req.chunks, payloads)


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


def next_logits(kv: KvPrefixCache, tokens: Sequence[int], n_chunks: int, upto: int) -> np.ndarray | None:
    """Logits after ``tokens[:upto]``, starting from the first ``n_chunks`` stored chunks
    (0: a cold prefill). Runs on the model thread. Batches are aligned as in
    `KvPrefixCache.generate`, so on the same hardware good chunks give identical logits."""
    assert kv.config is not None
    llm = kv.backend.llm
    c, a = kv.policy.chunk_tokens, kv.capture_every
    start = 0
    if n_chunks:
        hashes = chunk_hashes(kv.config, tokens, n_chunks)
        n, ok = kv.chunks.read_prefix(hashes, kv.chunk_bytes, kv._restore)
        if n != n_chunks or not ok:
            return None
        start = n * c
        llm.n_tokens = start
        llm.input_ids[:start] = tokens[:start]
    else:
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(kv._ctx), True)
    pos = start
    while pos < upto:
        end = min(upto, (pos // a + 1) * a)
        llm.eval(list(tokens[pos:end]))
        pos = end
    ptr = llama_cpp.llama_get_logits_ith(kv._ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def spot_check(kv: KvPrefixCache, tokens: Sequence[int], n_chunks: int) -> float | None:
    """Max |logit difference| after the restored prefix vs a cold prefill (inf: NaN or inf
    logits). None: the prefix could not be restored from the local store (a chunk evicted
    meanwhile, or not stored for the cap): nothing to blame the peer for."""
    start = n_chunks * kv.policy.chunk_tokens
    upto = min(len(tokens), (start // kv.capture_every + 1) * kv.capture_every)
    restored = next_logits(kv, tokens, n_chunks, upto)
    if restored is None:
        return None
    cold = next_logits(kv, tokens, 0, upto)
    assert cold is not None
    diff = float(np.max(np.abs(restored - cold)))
    return diff if np.isfinite(diff) else float("inf")


class KvPeerTier:
    """The requester side (`prefetch`, `after_generate`) and the advertiser of our chunks."""

    def __init__(self, service: NetService, kv: KvPrefixCache, config: KvNetConfig | None = None) -> None:
        self.service = service
        self.kv = kv
        self.config = config or KvNetConfig()
        self.rng = random.Random()
        self.stats = {"fetches": 0, "chunks_fetched": 0, "bytes_fetched": 0, "fetch_failures": 0,
                      "skipped_by_cost": 0, "skipped_by_score": 0, "spot_checks": 0, "spot_check_failures": 0,
                      "chunks_advertised": 0}
        assert kv.config is not None
        self._digest = kv.config.digest().hex()

    # -- advertising --------------------------------------------------------------------
    def _ad(self, h: bytes, depth: int) -> AdEntry:
        return AdEntry("kv_prefix", h.hex(), (depth + 1) * self.kv.chunk_bytes, self._digest)

    def inventory(self) -> list[AdEntry]:
        """Shared chunk tips for the periodic re-advertisement (blocking LMDB scan)."""
        return [self._ad(h, d) for h, d in self.kv.chunks.shared_tips(self.config.advertise_max)]

    # -- requester ------------------------------------------------------------------------
    def _eligible(self, providers: list[Provider]) -> list[Provider]:
        svc = self.service
        out = []
        for p in svc.tier.ranked(providers):  # minus ourselves and banned peers, best first
            if svc.rep.get(p.peer_id).score() > self.config.min_score:
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
        svc, kv, cfg = self.service, self.kv, self.config
        if not cfg.enabled or not svc.running or kv.config is None or keyed.model_hash != svc.model_hash:
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
            if svc.index.providers(hashes[i].hex(), "kv_prefix"):
                tip, providers = i, self._eligible(svc.index.providers(hashes[i].hex(), "kv_prefix"))
                break
        if tip < 0:
            return None
        first, end = max(have, tip + 1 - MAX_KV_CHUNKS), tip + 1
        if first > have:  # more than one request can carry: leave it to local prefill
            return None
        n = end - first
        for prov in providers[: cfg.max_providers]:
            rec = svc.rep.get(prov.peer_id)
            if cfg.cost_model and not svc.tier.cost.kv_prefix_pays(n * kv.chunk_bytes, n * c, rec):
                self.stats["skipped_by_cost"] += 1
                continue
            got = await self._fetch(prov, hashes, first, end)
            if got is None:
                continue
            if cfg.spot_check_rate > 0 and self.rng.random() < cfg.spot_check_rate:
                await self._spot_check(got, keyed.tokens)
            if not got.dropped:
                svc.rep.record_success(prov.peer_id, got.nbytes, got.fetch_ms / 1000)
            return got
        return None

    async def _fetch(self, prov: Provider, hashes: list[bytes], first: int, end: int) -> KvFetched | None:
        svc, kv = self.service, self.kv
        pid, want = prov.peer_id, hashes[first:end]
        timeout = svc.config.tier.fetch_timeout_s
        req = FetchRequest(want[-1].hex(), svc.model_hash, "kv_prefix", (first, end),
                           max_bytes=min(self.config.max_fetch_bytes, len(want) * (HASH_BYTES + kv.chunk_bytes)),
                           chunks=tuple(want))
        t0 = time.perf_counter()
        try:
            await svc.ensure_connected(pid, prov.addrs, timeout)
            got = await fetch(svc.host, pid, req, timeout_s=timeout)
            payloads = decode_body(got.body, want, kv.chunk_bytes)
        except NotFound:
            svc.index.forget(req.key, pid, "kv_prefix")  # evicted or no longer shared: no penalty
            return None
        except Busy:
            return None
        except BadResponse as exc:
            log.warning("KV: bad response from %s: %s", pid[:16], exc)
            self.stats["fetch_failures"] += 1
            svc.rep.record_bad(pid, str(exc))
            return None
        except (FetchTimeout, FetchError) as exc:  # slow, unreachable, vanished mid-transfer
            log.info("KV: fetch from %s failed: %s", pid[:16], exc)
            self.stats["fetch_failures"] += 1
            svc.rep.record_timeout(pid)
            return None
        fetch_ms = (time.perf_counter() - t0) * 1000
        c = kv.policy.chunk_tokens
        chunks = [NewChunk(h, first + i, c, p) for i, (h, p) in enumerate(zip(want, payloads))]
        await trio.to_thread.run_sync(kv.chunks.put_many, chunks, 0)
        self.stats["fetches"] += 1
        self.stats["chunks_fetched"] += len(want)
        self.stats["bytes_fetched"] += len(got.body)
        if svc.metrics is not None:
            svc.metrics.bytes_fetched.inc(len(got.body))
        log.info("KV: %d chunks (%d bytes) of %s from %s in %.1f ms", len(want), len(got.body),
                 req.key[:12], pid[:16], fetch_ms)
        return KvFetched(pid, first, end, list(want), len(got.body), fetch_ms)

    async def _spot_check(self, got: KvFetched, tokens: list[int]) -> None:
        svc, kv = self.service, self.kv
        diff = await svc.worker.run(lambda: spot_check(kv, tokens, got.end))
        if diff is None:
            return
        self.stats["spot_checks"] += 1
        got.spot_checked, got.spot_check_diff = True, diff
        if diff <= self.config.spot_check_tolerance:
            return
        # A verified failure: our own prefill disagrees with the peer's chunks.
        got.dropped = True
        self.stats["spot_check_failures"] += 1
        if svc.metrics is not None:
            svc.metrics.verification_failures.inc()
        await trio.to_thread.run_sync(kv.chunks.drop, got.hashes)
        reason = f"kv_prefix chunks {got.first}..{got.end - 1} failed the spot-check (logit diff {got.spot_check_diff:.3g})"
        log.warning("KV: %s served bad chunks: %s", got.peer[:16], reason)
        rec = svc.rep.record_verified_failure(got.peer, None, reason)
        if rec.banned():
            svc.on_banned(got.peer)

    async def after_generate(
        self, keyed: Keyed, pg: PrefixGeneration, got: KvFetched | None
    ) -> KvPeerDetails | None:
        """After L3 stored its chunks: learn our prefill speed, mark a shared request's chunks
        shareable and advertise the new ones. Returns what the peer's chunks gave, if any."""
        svc, kv = self.service, self.kv
        gen = pg.generation
        svc.tier.cost.observe_prefill(gen.prompt_tokens - pg.cached_tokens, gen.prefill_ms / 1000)
        details: KvPeerDetails | None = None
        c = kv.policy.chunk_tokens
        if got is not None:
            used = 0 if got.dropped else max(0, min(pg.cached_tokens, got.end * c) - got.first * c)
            details = KvPeerDetails(
                peer=got.peer, tokens=used, chunks=got.end - got.first, bytes=got.nbytes,
                fetch_ms=round(got.fetch_ms, 2), spot_checked=got.spot_checked, rejected=got.dropped,
                spot_check_diff=round(got.spot_check_diff, 4) if got.spot_check_diff is not None else None,
            )
        if keyed.request.share and kv.config is not None and svc.running:
            limit = kv.policy.max_store_tokens or kv.backend.config.n_ctx
            hashes = chunk_hashes(kv.config, keyed.tokens, min(len(keyed.tokens), limit) // c)
            try:
                new = set(await trio.to_thread.run_sync(kv.chunks.mark_shared, hashes))
            except Exception as exc:  # an LMDB error: the chunks simply stay private
                log.warning("KV chunks of %s not marked shared: %s", keyed.key[:12], exc)
                new = set()
            ads = [self._ad(h, d) for d, h in enumerate(hashes) if h in new]
            if ads:
                svc.advertise_ads(ads)
                self.stats["chunks_advertised"] += len(ads)
        return details


def attach_kv_tier(service: NetService, kv: KvPrefixCache, resolver: Any, config: KvNetConfig) -> KvPeerTier | None:
    """Wire kv_prefix into a node: serve shared chunks, advertise them, fetch before L3."""
    from p2pcache.net.fetch import ChainSource

    if not config.enabled or not kv.enabled or kv.config is None:
        return None
    tier = KvPeerTier(service, kv, config)
    service.server.source = ChainSource(service.server.source, KvSource(kv, service.model_hash))
    service.kv_tier = tier
    resolver.kv_remote = tier
    return tier
