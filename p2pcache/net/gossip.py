"""GossipSub on a running host, and the narrow view of it that the directory and trust get.

A node gossips on two topics per model: adverts (`p2pcache.net.ads`) and evidence
(`p2pcache.net.evidence`). Peers are scored by GossipSub's own counters plus the node's
reputation of them (``app_score``), so a banned peer is dropped from the mesh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
READY_TIMEOUT_S = 10.0


class Gossip(Protocol):
    """Publishing on a topic and who is in its mesh (adverts reach mesh peers only)."""

    async def publish(self, topic: str, data: bytes) -> None: ...

    def mesh(self, topic: str) -> set[str]:
        """Peer ids in our mesh for ``topic``."""
        ...


class PubsubGossip:
    """`Gossip` over a started py-libp2p `Pubsub` and its `GossipSub` router."""

    def __init__(self, pubsub: Pubsub, router: GossipSub) -> None:
        self.pubsub = pubsub
        self.router = router

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    def mesh(self, topic: str) -> set[str]:
        return {p.to_base58() for p in self.mesh_ids(topic)}

    def mesh_ids(self, topic: str) -> set[ID]:
        return set(self.router.mesh.get(topic, ()))

    def subscribers(self, topic: str) -> set[ID]:
        return set(self.pubsub.peer_topics.get(topic, ()))


@asynccontextmanager
async def running_gossip(
    host: IHost, *, app_score: Callable[[str], float], heartbeat_s: int
) -> AsyncIterator[PubsubGossip]:
    """Pubsub with a GossipSub router on ``host``, ready to subscribe; stopped on exit."""
    score = ScoreParams(
        p4_invalid_messages=TopicScoreParams(weight=-10.0, cap=100.0, decay=0.9),
        p6_appl_slack_weight=1.0,
        p6_appl_slack_decay=1.0,
        app_specific_score_fn=lambda pid: app_score(pid.to_base58()),
        gossip_threshold=-100.0,
        publish_threshold=-200.0,
        graylist_threshold=-500.0,
    )
    router = GossipSub(
        protocols=GOSSIPSUB_PROTOCOLS,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=heartbeat_s,
        heartbeat_initial_delay=0.1,
        score_params=score,
    )
    pubsub = Pubsub(host, router)
    async with background_trio_service(pubsub), background_trio_service(router):
        with trio.fail_after(READY_TIMEOUT_S):
            await pubsub.wait_until_ready()
        yield PubsubGossip(pubsub, router)
