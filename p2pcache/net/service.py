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
from p2pcache.net.evidence import evidence_topic
from p2pcache.net.fetch import FetchServer
from p2pcache.net.gossip import PubsubGossip, running_gossip
from p2pcache.net.host import HostConfig, running_host
from p2pcache.net.kv_tier import KvPeerTier
from p2pcache.net.peers import PeerConnections
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
                }
            )
        return out

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        return self.trust.reputation(peer_id)

    def stats(self) -> dict[str, Any]:
        """Counters for /admin/peers: adverts accepted/rejected by reason, evidence, server, L2."""
        d = self.directory
        return {
            "ads": {
                "accepted": d.validator.stats.accepted,
                "rejected": dict(d.validator.stats.rejected),
            },
            "evidence": dict(self.trust.stats),
            "server": dict(vars(self.server.stats)),
            "published": dict(d.stats),
            "tier": dict(self.l2.stats) if self.l2 is not None else {},
            "warm": dict(self.connections.warm.stats),
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
        hc = HostConfig(listen=tuple(self.config.listen), psk=self.config.psk)
        async with running_host(self.identity, hc) as host:
            self.server.install(host)
            async with running_gossip(
                host, app_score=self.trust.gossip_score, heartbeat_s=self.config.heartbeat_s
            ) as gossip:
                ads, evidence = ads_topic(self.model_hash), evidence_topic(self.model_hash)
                gossip.pubsub.set_topic_validator(ads, self.directory.validator, False)
                gossip.pubsub.set_topic_validator(evidence, self.trust.validate_evidence, False)
                subs = [await gossip.pubsub.subscribe(ads), await gossip.pubsub.subscribe(evidence)]
                self.gossip = gossip
                try:
                    async with trio.open_nursery() as nursery:
                        for sub in subs:
                            nursery.start_soon(_drain, sub)
                        await nursery.start(self.connections.run, host, self.directory)
                        await nursery.start(self.directory.run, gossip)
                        await nursery.start(self.trust.run, gossip)
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
