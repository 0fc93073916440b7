"""The admin endpoints: ``GET /admin/status``, ``/admin/cache``, ``/admin/peers``,
``/admin/reputation``, ``/admin/providers``, ``GET /metrics`` (Prometheus), and the open
``GET /healthz`` and ``GET /p2p`` (what a peer needs to dial this node).

The admin check (token, or loopback clients only) is the app's (`p2pcache.api.app`); the CLI
reads these bodies.
"""

from __future__ import annotations

import re
import time
from typing import Any

import trio
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from p2pcache.api.bodies import FastJSON
from p2pcache.api.context import NodeContext
from p2pcache.api.errors import ApiError
from p2pcache.store import Entry
from p2pcache.version import __version__

_KEY = re.compile(r"[0-9a-f]{64}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")
_MAX_ENTRIES = 1000
_MAX_WAIT_S = 60.0


class AdminApi:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def status(self, http: HttpRequest) -> Response:
        ctx, worker = self.ctx, self.ctx.worker
        return FastJSON(
            {
                "peer_id": ctx.peer_id,
                "model": ctx.model_id,
                "model_hash": ctx.model_hash,
                "model_path": str(ctx.model_path),
                "addrs": ctx.network.addrs(),
                "listen": list(ctx.settings.listen),
                "bootstrap": list(ctx.bootstrap),
                "http": list(ctx.http_urls),
                "data_dir": str(ctx.data_dir),
                "version": __version__,
                "uptime_s": round(time.time() - ctx.started_at, 3),
                "draining": ctx.draining,
                "share_by_default": ctx.settings.share_by_default,
                "queue_depth": worker.waiting,
                "max_queue": worker.max_waiting,
                "model_busy": worker.running,
                "computations": ctx.resolver.computations,
                "discovery": ctx.network.discovery_state(),
                **ctx.network.reachability(),  # "reachability", "relay", "reach_server"
            }
        )

    async def cache(self, http: HttpRequest) -> Response:
        """Store counters and answers by level; ``?entries=N``: the N most recently used."""
        raw = http.query_params.get("entries", "0")
        if not raw.isdigit() or int(raw) > _MAX_ENTRIES:
            message = f"entries must be an integer from 0 to {_MAX_ENTRIES}"
            raise ApiError(400, message, param="entries")
        store = self.ctx.store
        s = await trio.to_thread.run_sync(store.stats)  # may flush hit counters (fsync)
        doc: dict[str, Any] = {**vars(s), "hit_rate": s.hit_rate, "model_hash": self.ctx.model_hash}
        doc["answers_by_level"] = self.ctx.metrics.answers_by_level()
        if n := int(raw):

            def recent() -> list[Entry]:
                def used(e: Entry) -> int:
                    return max(e.inserted_at, e.last_hit_at)

                return sorted(store.iter_entries(), key=used, reverse=True)[:n]

            doc["entries"] = [_entry(e) for e in await trio.to_thread.run_sync(recent)]
        return FastJSON(doc)

    async def peers(self, http: HttpRequest) -> Response:
        net = self.ctx.network
        return FastJSON({"peer_id": self.ctx.peer_id, "peers": net.peers(), "stats": net.stats()})

    async def reputation(self, http: HttpRequest) -> Response:
        """Every peer's record, or one peer's (``?peer_id=``) with its evidence spelled out."""
        peer = http.query_params.get("peer_id")
        if peer is not None and not _PEER_ID.fullmatch(peer):
            raise ApiError(400, "peer_id must be a base58 libp2p peer id", param="peer_id")
        rows = self.ctx.network.reputation(peer) if peer else self.ctx.network.reputation()
        return FastJSON({"peer_id": self.ctx.peer_id, "peers": rows})

    async def providers(self, http: HttpRequest) -> Response:
        """Peers that advertised ``key`` (gossip index), optionally waiting up to ``wait_s`` for
        the first advert to arrive: lets scripts wait for propagation on an event, not a sleep."""
        q = http.query_params
        key, level = q.get("key", ""), q.get("level", "decoder_final")
        if not _KEY.fullmatch(key):
            message = "key must be 64 lowercase hex characters (an input_sha256)"
            raise ApiError(400, message, param="key")
        if level not in ("decoder_final", "kv_prefix"):
            raise ApiError(400, "level must be decoder_final or kv_prefix", param="level")
        try:
            wait_s = float(q.get("wait_s", "0"))
        except ValueError:
            wait_s = -1.0
        if not 0.0 <= wait_s <= _MAX_WAIT_S:
            message = f"wait_s must be a number from 0 to {_MAX_WAIT_S:g}"
            raise ApiError(400, message, param="wait_s")
        found = await self.ctx.network.wait_providers(key, level, wait_s)
        doc = {"peer_id": self.ctx.peer_id, "key": key, "level": level, "providers": found}
        return FastJSON(doc)

    async def metrics(self, http: HttpRequest) -> Response:
        # reads store stats (may fsync)
        body = await trio.to_thread.run_sync(self.ctx.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def p2p(self, http: HttpRequest) -> Response:
        """Open to anyone (``bootstrap_http`` of other nodes): the peer id, model hash and
        dialable addresses, the same facts every advert this node gossips carries."""
        ctx = self.ctx
        doc = {"peer_id": ctx.peer_id, "model_hash": ctx.model_hash, "addrs": ctx.network.addrs()}
        return FastJSON(doc)

    async def healthz(self, http: HttpRequest) -> Response:
        if self.ctx.draining:
            return FastJSON({"status": "draining"}, status_code=503)
        return FastJSON({"status": "ok"})

    def live_values(self) -> dict[str, Any]:
        """What `NodeMetrics` reads at scrape time (on a thread: store stats may fsync)."""
        ctx = self.ctx
        s = ctx.store.stats()
        rows = ctx.network.reputation()
        scores = [(str(p.get("peer_id")), float(p.get("score", 0.0))) for p in rows]
        return {
            "queue_depth": ctx.worker.waiting,
            "running": ctx.worker.running,
            "computations": ctx.resolver.computations,
            "entries": s.entries,
            "bytes": s.bytes,
            "peers": len(ctx.network.peers()),
            "peer_scores": scores,
        }


def _entry(e: Entry) -> dict[str, Any]:
    return {
        "input_sha256": e.input_sha256,
        "model_hash": e.model_hash,
        "cache_level": e.cache_level,
        "privacy_flag": e.privacy_flag,
        "hits": e.hits,
        "size": e.size,
        "producer": e.producer,
        "inserted_at": e.inserted_at,
        "last_hit_at": e.last_hit_at,
        "text": e.output.text[:200],
    }
