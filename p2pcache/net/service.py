"""`NetService`: the libp2p side of a node, started in the node's nursery.

Seam for the daemon (issue 4, `p2pcache.node.runtime`)::

    service = create_network_service(runtime)   # builds NetService + registers PeerTier (L2)
    await nursery.start(service.run)            # returns once listening and subscribed
    ...                                         # cancel the nursery scope to stop

`run` opens the host (Noise + yamux, optional PSK), GossipSub with the ad and evidence topics
and their validators, the fetch server, and background tasks (ad batching, re-advertising,
bootstrap dialing, evidence re-verification), all inside its own nursery: cancelling `run`
closes everything; no task outlives it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

from p2pcache.identity import Identity
from p2pcache.net import fastpath
from p2pcache.net.ads import MAX_AD_ENTRIES, AdEntry, AdValidator, GossipIndex, ads_topic, make_advert
from p2pcache.net.evidence import EvidenceRejected, decode_evidence, describe_evidence, evidence_topic
from p2pcache.net.fetch import FetchServer, ServerLimits, StoreSource
from p2pcache.net.host import HostConfig, dial, full_addrs, running_host
from p2pcache.net.kv_tier import KvNetConfig, KvPeerTier, attach_kv_tier
from p2pcache.net.reputation import Reputation, ReputationConfig
from p2pcache.net.tier import PeerTier, TierConfig
from p2pcache.net.verify import BackendScorer, verify_decoder_final
from p2pcache.net.warm import WarmConfig, WarmConnections
from p2pcache.store import Entry, Store

if TYPE_CHECKING:
    from p2pcache.api.metrics import NodeMetrics
    from p2pcache.backend import BackendWorker
    from p2pcache.node.runtime import NodeRuntime
    from p2pcache.resolver import Resolver

log = logging.getLogger(__name__)

GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
PSK_ENV = "P2PCACHE_PSK"


@dataclass(frozen=True)
class NetConfig:
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: Sequence[str] = ()
    psk: str | None = None
    fast_path: bool = True
    ad_batch_s: float = 0.25  # new entries are batched this long into one advert
    readvertise_s: float = 30.0  # full inventory re-announced (new peers learn old entries)
    readvertise_max: int = 4096  # newest shared entries re-announced
    readvertise_min_gap_s: float = 2.0  # at most this often when new mesh peers keep joining
    heartbeat_s: int = 1
    dial_timeout_s: float = 10.0
    bootstrap_retry_s: float = 2.0
    bootstrap_attempts: int = 30
    server: ServerLimits = field(default_factory=ServerLimits)
    tier: TierConfig = field(default_factory=TierConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)  # producers dialled ahead of need
    max_ad_age_s: float = 600.0


class NetService:
    def __init__(self, identity: Identity, store: Store, model_hash: str,
                 worker: BackendWorker | None, config: NetConfig | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.identity = identity
        self.metrics = metrics
        self.store = store
        self.model_hash = model_hash
        self.worker = worker
        self.config = config or NetConfig()
        self.rep = Reputation(store.env, self.config.reputation)
        self.index = GossipIndex()
        self.index.on_change = self._index_changed
        self._index_event = trio.Event()  # set (and replaced) whenever an advert lands
        self.validator = AdValidator(model_hash, self.index, identity.peer_id,
                                     is_banned=self.rep.is_banned, max_age_s=self.config.max_ad_age_s)
        self.server = FetchServer(identity, StoreSource(store, model_hash), self.config.server,
                                  is_banned=self.rep.is_banned,
                                  on_served=metrics.bytes_served.inc if metrics is not None else lambda _n: None)
        self.tier = PeerTier(self, self.config.tier)
        self.warm = WarmConnections(self.config.warm, identity.peer_id, connected=self._connected_ids,
                                    dial=self._dial_addrs, score=self.rep.score, is_banned=self.rep.is_banned)
        self.kv_tier: KvPeerTier | None = None  # kv_prefix over the network (p2pcache.net.kv_tier)
        self.host: IHost | None = None  # type: ignore[assignment]
        self.pubsub: Pubsub | None = None
        self.router: GossipSub | None = None
        self.running = False
        self.evidence_stats = {"accepted": 0, "rejected": 0, "confirmed": 0, "refuted": 0}
        self.publish_stats = {"adverts": 0, "inventory_rounds": 0, "rounds_for_new_mesh_peers": 0}
        self._pending: dict[str, AdEntry] = {}
        self._pending_wake = trio.Event()
        self._seq = 0
        self._evidence_send, self._evidence_recv = trio.open_memory_channel[bytes](64)
        self._nursery: trio.Nursery | None = None

    # -- the daemon's view --------------------------------------------------------------
    def addrs(self) -> list[str]:
        return full_addrs(self.host) if self.host is not None and self.running else []

    def peers(self) -> list[dict[str, Any]]:
        if self.host is None or not self.running:
            return []
        out = []
        topic = ads_topic(self.model_hash)
        subscribed = self.pubsub.peer_topics.get(topic, set()) if self.pubsub else set()
        mesh = self.router.mesh.get(topic, set()) if self.router is not None else set()
        for pid in self.host.get_connected_peers():
            s = pid.to_base58()
            rec = self.rep.get(s)
            out.append({"peer_id": s, "addrs": [str(a) for a in self.host.get_peerstore().addrs(pid)]
                        if _has_addrs(self.host, pid) else [], "score": round(rec.score(), 4),
                        "banned": rec.banned(), "subscribed": pid in subscribed, "mesh": pid in mesh,
                        "advertised_keys": self.index.count_of(s)})
        return out

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        """Every known peer (or one): score, counts, last seen, ban state, evidence.

        With ``peer_id`` the evidence ids are expanded into what each proof says (accuser,
        reason, key, time), read back from LMDB."""
        if peer_id is None:
            return [{**r.to_dict(), "banned": r.banned()} for r in self.rep.all()]
        rec = self.rep.get(peer_id)
        return [{**rec.to_dict(), "banned": rec.banned(),
                 "evidence_detail": [describe_evidence(self.rep, e) for e in rec.evidence]}]

    def stats(self) -> dict[str, Any]:
        """Counters for /admin/peers: adverts accepted/rejected by reason, evidence, server, L2."""
        return {"ads": {"accepted": self.validator.stats.accepted, "rejected": dict(self.validator.stats.rejected)},
                "evidence": dict(self.evidence_stats), "server": dict(vars(self.server.stats)),
                "published": dict(self.publish_stats),
                "tier": dict(self.tier.stats), "warm": dict(self.warm.stats), "index": self.index.snapshot(),
                **({"kv": dict(self.kv_tier.stats)} if self.kv_tier is not None else {})}

    def _index_changed(self) -> None:
        self._index_event.set()
        self._index_event = trio.Event()

    async def wait_providers(self, key: str, level: str = "decoder_final", wait_s: float = 0.0) -> list[str]:
        """Providers of ``key`` in the gossip index, waiting up to ``wait_s`` for the first one."""
        with trio.move_on_after(max(0.0, min(wait_s, 60.0))):
            while not self.index.providers(key, level):
                await self._index_event.wait()
        return [p.peer_id for p in self.index.providers(key, level)]

    # -- advertising --------------------------------------------------------------------
    def advertise(self, entry: Entry) -> None:
        """Queue a shared entry for the next advert batch. Private entries never leave."""
        if entry.privacy_flag or entry.model_hash != self.model_hash:
            return
        self._pending[entry.input_sha256] = AdEntry(entry.cache_level, entry.input_sha256,
                                                    entry.size, entry.output.sha256())
        self._pending_wake.set()

    def advertise_ads(self, ads: Sequence[AdEntry]) -> None:
        """Queue ready-made ad entries (kv_prefix chunk tips, which are not store entries)."""
        for ad in ads:
            self._pending[f"{ad.cache_level}:{ad.key}"] = ad
        if ads:
            self._pending_wake.set()

    def _next_seq(self) -> int:
        # Microseconds since the epoch, strictly increasing: survives restarts (no replays).
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    async def _publish_ads(self, entries: list[AdEntry]) -> None:
        assert self.pubsub is not None
        for i in range(0, len(entries), MAX_AD_ENTRIES // 2):
            ad = make_advert(self.identity, self.model_hash, self.addrs()[:4], self._next_seq(),
                             entries[i:i + MAX_AD_ENTRIES // 2])
            await self.pubsub.publish(ads_topic(self.model_hash), ad.encode())
            self.publish_stats["adverts"] += 1

    async def _ad_batcher(self) -> None:
        while True:
            await self._pending_wake.wait()
            await trio.sleep(self.config.ad_batch_s)
            self._pending_wake = trio.Event()
            batch, self._pending = list(self._pending.values()), {}
            if batch:
                try:
                    await self._publish_ads(batch)
                except Exception as exc:
                    log.warning("could not publish %d adverts: %r", len(batch), exc)

    def shared_inventory(self) -> list[AdEntry]:
        entries = [e for e in self.store.iter_entries(self.model_hash)
                   if not e.privacy_flag and e.cache_level == "decoder_final"]
        entries.sort(key=lambda e: e.inserted_at, reverse=True)
        kv = self.kv_tier.inventory() if self.kv_tier is not None else []
        return [AdEntry(e.cache_level, e.input_sha256, e.size, e.output.sha256())
                for e in entries[: self.config.readvertise_max]] + kv

    async def _readvertiser(self) -> None:
        """Re-announce the inventory every `readvertise_s`, and soon after a new peer joins our
        ad mesh (adverts only go to mesh peers: one that joined later missed them; at start-up
        the mesh is empty, so this is also when a restarted node first announces)."""
        topic = ads_topic(self.model_hash)
        known: set[ID] = set()
        early = False  # this round was brought forward by a new mesh peer
        while True:
            inv = await trio.to_thread.run_sync(self.shared_inventory)
            if inv:
                try:
                    await self._publish_ads(inv)
                    self.publish_stats["inventory_rounds"] += 1
                    self.publish_stats["rounds_for_new_mesh_peers"] += early
                except Exception as exc:
                    log.warning("could not re-advertise: %r", exc)
            sent_at, joined = trio.current_time(), False
            with trio.move_on_after(self.config.readvertise_s) as waited:
                while True:
                    # GossipSub has no mesh-change event: look once per heartbeat
                    await trio.sleep(self.config.heartbeat_s)
                    mesh = set(self.router.mesh.get(topic, ())) if self.router is not None else set()
                    joined, known = joined or bool(mesh - known), mesh
                    if joined and trio.current_time() - sent_at >= self.config.readvertise_min_gap_s:
                        break
            early = not waited.cancelled_caught

    # -- evidence -------------------------------------------------------------------------
    async def publish_evidence(self, data: bytes) -> None:
        if self.pubsub is None:
            return
        try:
            await self.pubsub.publish(evidence_topic(self.model_hash), data)
        except Exception as exc:
            log.warning("could not publish evidence: %r", exc)

    def _evidence_validator(self, forwarder: object, msg: Any) -> bool:
        try:
            ev = decode_evidence(bytes(msg.data), self.model_hash)
            if ID(msg.from_id).to_base58() != ev.accuser:
                raise EvidenceRejected("origin is not the accuser")
        except (EvidenceRejected, Exception) as exc:
            self.evidence_stats["rejected"] += 1
            log.info("evidence rejected: %s", exc)
            return False
        self.evidence_stats["accepted"] += 1
        if ev.accuser != self.identity.peer_id:
            try:
                self._evidence_send.send_nowait(bytes(msg.data))
            except trio.WouldBlock:
                log.warning("evidence queue full; dropped one")
        return True

    async def _evidence_checker(self) -> None:
        """Re-verify received evidence on our own model before acting on it."""
        async for data in self._evidence_recv:
            try:
                ev = decode_evidence(data, self.model_hash)
                if self.worker is None:
                    continue
                scorer = BackendScorer(self.worker.backend)
                entry = ev.entry()
                verdict = await self.worker.run(lambda: verify_decoder_final(
                    scorer, entry, ev.header.key, self.model_hash, list(ev.prompt), ev.sampling_params(),
                    self.config.tier.verify))
            except Exception as exc:
                log.warning("evidence could not be checked: %r", exc)
                continue
            if verdict.ok:  # the accused answer is right: the accuser lied
                self.evidence_stats["refuted"] += 1
                self.rep.record_bad(ev.accuser, "false accusation")
                log.warning("evidence from %s refuted: %s is innocent", ev.accuser[:16], ev.liar[:16])
            else:
                self.evidence_stats["confirmed"] += 1
                rec = self.rep.record_verified_failure(ev.liar, data, f"evidence from {ev.accuser[:16]}: {verdict.reason}")
                if rec.banned():
                    self.on_banned(ev.liar)
                log.warning("evidence confirmed: %s lied (%s)", ev.liar[:16], verdict.reason)

    def on_banned(self, peer_id: str) -> None:
        """A banned peer's adverts are dropped and its connection closed (it may not redial:
        the fetch server and the ad validator refuse it while the ban lasts)."""
        self.index.forget_peer(peer_id)
        if self._nursery is not None and self.host is not None:
            self._nursery.start_soon(self._disconnect, peer_id)

    async def _disconnect(self, peer_id: str) -> None:
        assert self.host is not None
        try:
            with trio.move_on_after(5):
                await self.host.disconnect(ID.from_base58(peer_id))
        except Exception as exc:
            log.info("could not disconnect %s: %r", peer_id[:16], exc)

    # -- connections ------------------------------------------------------------------------
    def _connected_ids(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_connected_peers()} if self.host is not None else set()

    async def ensure_connected(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> None:
        assert self.host is not None
        pid = ID.from_base58(peer_id)
        if pid not in self.host.get_connected_peers():
            await self.warm.wait_inflight(peer_id, timeout_s)  # a warm-up dial may be half done
        if pid in self.host.get_connected_peers() or not addrs:
            return  # without addrs: maybe reachable through the peerstore (new_stream dials)
        await self._dial_addrs(peer_id, addrs, timeout_s)

    async def _dial_addrs(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> None:
        """Connect to ``peer_id`` at the first of ``addrs`` that answers, else FetchError."""
        assert self.host is not None
        last: BaseException | None = None
        for a in addrs:
            try:
                await dial(self.host, a if "/p2p/" in a else f"{a}/p2p/{peer_id}", timeout_s)
                return
            except (Exception, trio.TooSlowError) as exc:  # try the next address
                last = exc
        from p2pcache.net.fetch import FetchError
        raise FetchError(f"cannot reach {peer_id[:16]}: {last!r}")

    async def _bootstrapper(self) -> None:
        pending = list(self.config.bootstrap)
        for _ in range(self.config.bootstrap_attempts):
            if not pending:
                return
            still = []
            for a in pending:
                try:
                    await dial(self.host, a, self.config.dial_timeout_s)
                    log.info("connected to bootstrap %s", a)
                except BaseException as exc:  # noqa: BLE001 - dial errors come as groups
                    if isinstance(exc, trio.Cancelled):
                        raise
                    still.append(a)
            pending = still
            if pending:
                await trio.sleep(self.config.bootstrap_retry_s)
        if pending:
            log.warning("bootstrap peers unreachable: %s", pending)

    async def _drain(self, sub: Any) -> None:
        while True:
            await sub.get()  # validated already; the validator fed the index

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.config.fast_path:
            fastpath.install()
        score = ScoreParams(
            p4_invalid_messages=TopicScoreParams(weight=-10.0, cap=100.0, decay=0.9),
            p6_appl_slack_weight=1.0, p6_appl_slack_decay=1.0,
            app_specific_score_fn=lambda pid: self.rep.gossip_score(pid.to_base58()),
            gossip_threshold=-100.0, publish_threshold=-200.0, graylist_threshold=-500.0,
        )
        gossipsub = GossipSub(protocols=GOSSIPSUB_PROTOCOLS, degree=6, degree_low=4, degree_high=12,
                              heartbeat_interval=self.config.heartbeat_s, heartbeat_initial_delay=0.1,
                              score_params=score)
        hc = HostConfig(listen=tuple(self.config.listen), psk=self.config.psk)
        async with running_host(self.identity, hc) as host:
            self.host = host
            pubsub = Pubsub(host, gossipsub)
            self.pubsub = pubsub
            self.router = gossipsub
            self.server.install(host)
            try:
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    with trio.fail_after(10):
                        await pubsub.wait_until_ready()
                    pubsub.set_topic_validator(ads_topic(self.model_hash), self.validator, False)
                    pubsub.set_topic_validator(evidence_topic(self.model_hash), self._evidence_validator, False)
                    ads_sub = await pubsub.subscribe(ads_topic(self.model_hash))
                    ev_sub = await pubsub.subscribe(evidence_topic(self.model_hash))
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._drain, ads_sub)
                        nursery.start_soon(self._drain, ev_sub)
                        nursery.start_soon(self._ad_batcher)
                        nursery.start_soon(self._readvertiser)
                        nursery.start_soon(self._evidence_checker)
                        nursery.start_soon(self._bootstrapper)
                        nursery.start_soon(self.warm.run, lambda: self._index_event, lambda: self.index.addrs)
                        self.running = True
                        log.info("p2p node %s listening on %s", self.identity.peer_id, self.addrs())
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                self.running = False
                self.pubsub = None
                self.router = None
                self._nursery = None


def _has_addrs(host: IHost, pid: ID) -> bool:
    try:
        host.get_peerstore().addrs(pid)
        return True
    except Exception:
        return False


def register_tier(resolver: Resolver, tier: PeerTier) -> None:
    """Put L2 after L0/L1 and before anything later (L3 is the resolver's fallback)."""
    tiers = resolver.tiers
    pos = len(tiers)
    for i, t in enumerate(tiers):
        if getattr(t, "level", "") not in ("L0", "L1"):
            pos = i
            break
    tiers.insert(pos, tier)


def load_psk(data_dir: Path | None) -> str | None:
    """``$P2PCACHE_PSK`` (64 hex), else ``<data dir>/swarm.key`` if present, else None."""
    if v := os.environ.get(PSK_ENV):
        return v.strip()
    if data_dir is not None and (p := Path(data_dir) / "swarm.key").is_file():
        return p.read_text().strip()
    return None


def create_network_service(runtime: NodeRuntime) -> NetService:
    """The daemon's factory (see `p2pcache.node.runtime.load_network_factory`)."""
    local = runtime.local
    cfg = NetConfig(listen=tuple(runtime.config.listen), bootstrap=tuple(runtime.bootstrap),
                    psk=load_psk(local.data_dir.root), warm=WarmConfig(max_peers=runtime.config.warm_peers))
    service = NetService(local.identity, local.store, local.model_hash, local.worker, cfg, runtime.metrics)
    register_tier(local.resolver, service.tier)
    if local.kv is not None and local.resolver.kv is not None:
        c = runtime.config
        attach_kv_tier(service, local.kv, local.resolver, KvNetConfig(
            enabled=c.kv_net, min_score=c.kv_peer_min_score, spot_check_rate=c.kv_spot_check_rate))
    return service
