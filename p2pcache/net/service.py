"""`NetService`: the libp2p side of a node, started in the node's nursery.

The network is made of parts, each with one job, built by the node's composition root
(`p2pcache.node.build`) and handed to the service:

- `PeerConnections` (peers.py): the host, dialing, warm connections;
- `Directory` (directory.py): the gossip index, advert batching and re-advertising;
- `Trust` (trust.py): reputation, evidence publishing and checking, bans;
- `Selection` (selection.py): provider ranking and the fetch-or-compute cost model;
- the fetch server (fetch.py), and the tiers that use the parts (`PeerTier`, `KvPeerTier`).

The service owns the lifecycle: `run` opens the host (Noise + yamux, optional PSK) and
GossipSub with the ad and evidence topics and their validators, installs the fetch server,
and runs each part inside its own nursery: cancelling `run` closes everything; no task
outlives it. It is also the `NetworkView` the daemon and the admin API read.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2pcache.identity import Identity
from p2pcache.net import fastpath
from p2pcache.net.ads import ads_topic
from p2pcache.net.config import NetConfig
from p2pcache.net.directory import Directory
from p2pcache.net.discovery import Discovery
from p2pcache.net.evidence import evidence_topic
from p2pcache.net.fetch import FetchServer
from p2pcache.net.gossip import PubsubGossip, boolean_verdict, running_gossip
from p2pcache.net.host import HostConfig, running_host
from p2pcache.net.kv_tier import KvPeerTier
from p2pcache.net.peers import PeerConnections
from p2pcache.net.reachability import ReachabilityChecker, ReachServer
from p2pcache.net.relay import Relays
from p2pcache.net.scoring import GossipScoring
from p2pcache.net.tier import PeerTier
from p2pcache.net.trust import Trust

log = logging.getLogger(__name__)


class NetService:
    """Runs the parts of the network and shows them (`p2pcache.net.view.NetworkView`)."""

    def __init__(
        self,
        identity: Identity,
        model_hash: str,
        config: NetConfig,
        *,
        connections: PeerConnections,
        directory: Directory,
        trust: Trust,
        server: FetchServer,
        l2: PeerTier | None = None,
        kv: KvPeerTier | None = None,
    ) -> None:
        self.identity = identity
        self.model_hash = model_hash
        self.config = config
        self.connections = connections
        self.directory = directory
        self.trust = trust
        self.server = server
        self.l2 = l2  # read for stats only: the tiers never see the service
        self.kv = kv
        self.gossip: PubsubGossip | None = None  # while running
        self.discovery = Discovery(
            connections, model_hash, config.discovery, config.peers.bootstrap
        )
        # Reachability and relays: checked by peers' dial-backs; a private node holds a relay
        # slot and advertises its relayed address (through `PeerConnections.addrs`).
        self.relays = Relays(
            identity.peer_id, config.relay, candidates=lambda: list(config.peers.bootstrap)
        )
        self.reach = ReachabilityChecker(
            config.reach, own_addrs=connections.addrs, on_change=self.relays.on_reachability
        )
        self.reach_server = ReachServer(config.reach, psk=config.psk)
        connections.relayed = self.relays.relayed_addrs

    # -- the daemon's view ------------------------------------------------------------------
    def addrs(self) -> list[str]:
        return self.connections.addrs()

    def peers(self) -> list[dict[str, Any]]:
        if not self.connections.running:
            return []
        host = self.connections.host
        topic = ads_topic(self.model_hash)
        subscribed = self.gossip.subscribers(topic) if self.gossip is not None else set()
        mesh = self.gossip.mesh_ids(topic) if self.gossip is not None else set()
        out = []
        for pid in host.get_connected_peers():
            s = pid.to_base58()
            rec = self.trust.record(s)
            out.append(
                {
                    "peer_id": s,
                    "addrs": _addrs_of(host, pid),
                    "score": round(rec.score(), 4),
                    "banned": rec.banned(),
                    "subscribed": pid in subscribed,
                    "mesh": pid in mesh,
                    "advertised_keys": self.directory.index.count_of(s),
                    # GossipSub's score of the peer (None before the gossip runs)
                    "gossip": self.gossip.peer_score(s) if self.gossip is not None else None,
                }
            )
        return out

    def reachability(self) -> dict[str, Any]:
        """For /admin/status: the last verdict, relay slots held and relay service served."""
        return {
            "reachability": self.reach.snapshot(),
            "relay": self.relays.snapshot(),
            "reach_server": dict(vars(self.reach_server.stats)),
        }

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        return self.trust.reputation(peer_id)

    def discovery_state(self) -> dict[str, Any]:
        """Known providers, rendezvous points, last lookup (for /admin/status)."""
        return self.discovery.state()

    def stats(self) -> dict[str, Any]:
        """Counters for /admin/peers: adverts accepted/rejected by reason, evidence, server, L2."""
        d = self.directory
        return {
            "ads": {
                "accepted": d.validator.stats.accepted,
                "accepted_bytes": d.validator.stats.accepted_bytes,
                "rejected": dict(d.validator.stats.rejected),
            },
            "evidence": dict(self.trust.stats),
            "server": dict(vars(self.server.stats)),
            "published": dict(d.stats),
            "tier": dict(self.l2.stats) if self.l2 is not None else {},
            "warm": dict(self.connections.warm.stats),
            "conn": self.connections.conn_stats(),
            "index": d.index.snapshot(),
            **({"kv": dict(self.kv.stats)} if self.kv is not None else {}),
        }

    async def wait_providers(
        self, key: str, level: str = "decoder_final", wait_s: float = 0.0
    ) -> list[str]:
        return await self.directory.wait_providers(key, level, wait_s)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.config.fast_path:
            fastpath.install()
        hc = HostConfig(
            listen=tuple(self.config.listen), psk=self.config.psk, conn=self.config.peers.conn
        )
        async with running_host(self.identity, hc) as host:
            self.server.install(host)
            ads, evidence = ads_topic(self.model_hash), evidence_topic(self.model_hash)
            scoring = GossipScoring()
            async with running_gossip(
                host,
                app_score=self.trust.gossip_score,
                heartbeat_s=self.config.heartbeat_s,
                topic_weights={ads: scoring.ads_weight, evidence: scoring.evidence_weight},
                scoring=scoring,
            ) as gossip:
                gossip.set_validator(ads, self.directory.validator.verdict)
                # Evidence from an accuser we banned is dropped, not held against the relay.
                gossip.set_validator(
                    evidence,
                    boolean_verdict(self.trust.validate_evidence, self.trust.rep.is_banned),
                )
                subs = [await gossip.pubsub.subscribe(ads), await gossip.pubsub.subscribe(evidence)]
                self.gossip = gossip
                # Trimming spares the ad topic's mesh (GossipSub already chose it by score).
                self.connections.trimmer.protected = lambda: {
                    p.to_base58() for p in gossip.mesh_ids(ads)
                }
                try:
                    async with trio.open_nursery() as nursery:
                        for sub in subs:
                            nursery.start_soon(_drain, sub)
                        await nursery.start(self.connections.run, host, self.directory)
                        await nursery.start(self.directory.run, gossip)
                        await nursery.start(self.trust.run, gossip)
                        await nursery.start(self.discovery.run, host)
                        await nursery.start(self.relays.run, host)
                        if self.config.reach.enabled:
                            self.reach_server.install(host)
                            await nursery.start(self.reach.run, host)
                        log.info("p2p node %s listening on %s", self.identity.peer_id, self.addrs())
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self.gossip = None


async def _drain(sub: Any) -> None:
    while True:
        await sub.get()  # validated already: the validators did the work


def _addrs_of(host: IHost, pid: ID) -> list[str]:
    try:
        return [str(a) for a in host.get_peerstore().addrs(pid)]
    except Exception:  # a peer without addresses in the peerstore
        return []
