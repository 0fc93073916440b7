"""GossipSub on a running host, and the narrow view of it that the directory and trust get.

A node gossips on two topics per model: adverts (`p2pcache.net.ads`) and evidence
(`p2pcache.net.evidence`). Peers are scored by GossipSub's own counters plus the node's
reputation of them (``app_score``), with the parameters of `p2pcache.net.scoring`: a peer
that sends invalid messages, or that we banned, is graylisted (its messages dropped unread,
none sent to it). Validators answer a `Verdict`, so what an honest relay may forward (a stale
or replayed advert) is dropped without counting against it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import PeerScorer, ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

from p2pcache.net.scoring import GossipScoring, Verdict, decay_per_heartbeat

GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
READY_TIMEOUT_S = 10.0
PACE_QUEUE_LEN = 16  # our publishes wait while a peer's outbound queue (32) is half full
PACE_WAIT_S = 1.0
PACE_POLL_S = 0.005


class Gossip(Protocol):
    """Publishing on a topic and who is in its mesh (adverts reach mesh peers only)."""

    async def publish(self, topic: str, data: bytes) -> None: ...

    def mesh(self, topic: str) -> set[str]:
        """Peer ids in our mesh for ``topic``."""
        ...


class PubsubGossip:
    """`Gossip` over a started py-libp2p `Pubsub` and its `GossipSub` router."""

    def __init__(self, pubsub: Pubsub, router: GossipSub, scorer: TopicScorer) -> None:
        self.pubsub = pubsub
        self.router = router
        self.scorer = scorer
        self._publishing = trio.Lock()
        self._stuck: set[ID] = set()  # peers whose queue stayed full through a whole wait

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish, paced: py-libp2p drops (for good) whatever does not fit a peer's outbound
        queue (32 RPCs, as go-libp2p), so a burst of our own adverts (announce calls, an
        inventory round) is sent one at a time once every peer's queue has room."""
        async with self._publishing:
            await self._until_room()
            await self.pubsub.publish(topic, data)

    async def _until_room(self) -> None:
        """Until every peer's outbound queue is under `PACE_QUEUE_LEN`, waiting at most
        `PACE_WAIT_S`; a queue that stays full that long (a stalled peer) is not waited for
        again until it drains: one stuck peer must not slow every publish down."""
        full: set[ID] = set()
        with trio.move_on_after(PACE_WAIT_S) as waited:
            # py-libp2p's queue has no "drained" event to wait on: polled, within the bound
            while full := self._full_queues():  # noqa: ASYNC110
                await trio.sleep(PACE_POLL_S)
        if waited.cancelled_caught:
            self._stuck |= full
        queues = self.pubsub.peer_queues
        self._stuck = {p for p in self._stuck if len(queues.get(p, ())) >= PACE_QUEUE_LEN}

    def _full_queues(self) -> set[ID]:
        return {
            pid
            for pid, q in self.pubsub.peer_queues.items()
            if len(q) >= PACE_QUEUE_LEN and pid not in self._stuck
        }

    def mesh(self, topic: str) -> set[str]:
        return {p.to_base58() for p in self.mesh_ids(topic)}

    def mesh_ids(self, topic: str) -> set[ID]:
        return set(self.router.mesh.get(topic, ()))

    def subscribers(self, topic: str) -> set[ID]:
        return set(self.pubsub.peer_topics.get(topic, ()))

    def set_validator(self, topic: str, verdict: VerdictFn) -> None:
        """Validate ``topic``'s messages with ``verdict`` (sync: it runs on the pubsub loop).

        An IGNOREd message is marked seen (later copies from other relays are dropped before
        validation, as go-libp2p does: py-libp2p would otherwise answer them from its cache of
        failed validations and count each as invalid) and its forwarder is pardoned."""

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            self.scorer.pardon(None)
            v = verdict(forwarder, msg)
            if v is Verdict.IGNORE:
                self.pubsub.seen_messages.add(self.pubsub.get_message_id(msg))
                self.scorer.pardon(forwarder)
            return v is Verdict.ACCEPT

        self.pubsub.set_topic_validator(topic, validate, False)

    def peer_score(self, peer_id: str) -> dict[str, Any]:
        """The router's score of a peer, for the admin view and the tests."""
        pid = ID.from_base58(peer_id)
        s = self.scorer
        return {
            "score": round(s.score(pid), 4),
            "graylisted": s.is_graylisted(pid),
            # .get: reading py-libp2p's defaultdicts must not add peers to them
            "invalid": {
                t: round(s.invalid_messages.get(pid, {}).get(t, 0.0), 4) for t in s.topic_weights
            },
            "first_deliveries": {
                t: round(s.first_message_deliveries.get(pid, {}).get(t, 0.0), 4)
                for t in s.topic_weights
            },
        }

    def heartbeat(self) -> dict[str, Any]:
        """How many heartbeats have run, and the interval the router sleeps between them."""
        return {
            "heartbeats": self.scorer.heartbeats,
            "interval_s": self.router.heartbeat_interval,
            "adaptive": self.router.adaptive_gossip_enabled,
        }


def score_params(
    cfg: GossipScoring, heartbeat_s: float, app_score: Callable[[str], float]
) -> ScoreParams:
    """py-libp2p's `ScoreParams` for ``cfg`` at this heartbeat (decays are per heartbeat)."""

    def decay(half_life_s: float) -> float:
        return decay_per_heartbeat(half_life_s, heartbeat_s)

    return ScoreParams(
        p2_first_message_deliveries=TopicScoreParams(
            weight=cfg.first_delivery_weight,
            cap=cfg.first_delivery_cap,
            decay=decay(cfg.first_delivery_half_life_s),
        ),
        p4_invalid_messages=TopicScoreParams(
            weight=cfg.invalid_weight, cap=cfg.invalid_cap, decay=decay(cfg.invalid_half_life_s)
        ),
        p5_behavior_penalty_weight=cfg.behaviour_weight,
        p5_behavior_penalty_threshold=cfg.behaviour_threshold,
        p5_behavior_penalty_decay=decay(cfg.behaviour_half_life_s),
        p6_appl_slack_weight=cfg.app_weight,
        p6_appl_slack_decay=1.0,  # recomputed from the reputation at every score
        app_specific_score_fn=lambda pid: app_score(pid.to_base58()),
        gossip_threshold=cfg.gossip_threshold,
        publish_threshold=cfg.publish_threshold,
        graylist_threshold=cfg.graylist_threshold,
        accept_px_threshold=0.0,  # peer exchange (discovery) only from peers in good standing
    )


class TopicScorer(PeerScorer):
    """py-libp2p's `PeerScorer`, narrowly extended where 0.8.1 falls short of GossipSub v1.1:

    - per-topic weights (the spec's topic weight; py-libp2p has one set of P1-P4 parameters
      for every topic): each topic's P1-P4 sum is multiplied by its weight;
    - one score per peer, over all our topics, behind every gate: py-libp2p's single-topic
      publish and gossip gates leave out the application score and most behaviour penalties,
      so a banned peer's messages would still be accepted;
    - an IGNORE verdict (`pardon`): py-libp2p validators are boolean and every rejection
      counts as an invalid message of the forwarder; the validator pardons the forwarder
      just before it answers False, and the P4 count that follows (with no await in between)
      is skipped;
    - a heartbeat counter, so the heartbeat can be observed.
    """

    def __init__(self, params: ScoreParams, topic_weights: Mapping[str, float]) -> None:
        super().__init__(params)
        self.topic_weights = dict(topic_weights)
        self.heartbeats = 0
        self._pardoned: ID | None = None

    def topic_score(self, peer: ID, topic: str) -> float:
        return self.topic_weights.get(topic, 0.0) * super().topic_score(peer, topic)

    def score(self, peer: ID, topics: list[str] | None = None) -> float:
        return super().score(peer, list(self.topic_weights))

    def allow_publish(self, peer: ID, topics: list[str]) -> bool:
        return self.score(peer) >= self.params.publish_threshold

    def allow_gossip(self, peer: ID, topics: list[str]) -> bool:
        return self.score(peer) >= self.params.gossip_threshold

    def is_graylisted(self, peer: ID, topics: list[str] | None = None) -> bool:
        return self.score(peer) < self.params.graylist_threshold

    def pardon(self, peer: ID | None) -> None:
        self._pardoned = peer

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        if peer == self._pardoned:
            self._pardoned = None
            return
        super().on_invalid_message(peer, topic)

    def on_heartbeat(self, dt_seconds: float = 1.0) -> None:
        self.heartbeats += 1
        super().on_heartbeat(dt_seconds)


VerdictFn = Callable[[ID, rpc_pb2.Message], Verdict]


def boolean_verdict(
    validate: Callable[[ID, rpc_pb2.Message], bool], ignore_origin: Callable[[str], bool]
) -> VerdictFn:
    """A boolean validator as a verdict: a rejected message whose origin ``ignore_origin``
    names (e.g. one we banned: honest relays that did not ban it forward it) is ignored."""

    def verdict(forwarder: ID, msg: rpc_pb2.Message) -> Verdict:
        if validate(forwarder, msg):
            return Verdict.ACCEPT
        origin = ID(msg.from_id).to_base58() if msg.from_id else ""
        return Verdict.IGNORE if origin and ignore_origin(origin) else Verdict.REJECT

    return verdict


@asynccontextmanager
async def running_gossip(
    host: IHost,
    *,
    app_score: Callable[[str], float],
    heartbeat_s: int,
    topic_weights: Mapping[str, float],
    scoring: GossipScoring | None = None,
) -> AsyncIterator[PubsubGossip]:
    """Pubsub with a GossipSub router on ``host``, ready to subscribe; stopped on exit.
    ``topic_weights``: the topics we score peers on, and their weights."""
    scorer = TopicScorer(
        score_params(scoring or GossipScoring(), heartbeat_s, app_score), topic_weights
    )
    router = GossipSub(
        protocols=GOSSIPSUB_PROTOCOLS,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=heartbeat_s,
        heartbeat_initial_delay=0.1,
        # Adaptive gossip would stretch a 1 s heartbeat to 30-60 s in a small mesh (it reads
        # few mesh peers as poor health): meshes would then heal and re-advertise that slowly.
        adaptive_gossip_enabled=False,
        # The rate limiter runs after validation (it saves no work) and also on our own
        # publishes and on relays: it dropped our own adverts past 10/s, for good, and
        # stopped honest bursts from being forwarded (with a behaviour penalty). Floods are
        # bounded instead by the score: invalid messages graylist the sender (later ones are
        # dropped before validation), ignored replays are marked seen, and the ad index is
        # bounded.
        spam_protection_enabled=False,
        do_px=True,  # prunes name other peers: discovery beyond the bootstrap node
        px_peers_count=8,
    )
    router.scorer = scorer
    pubsub = Pubsub(host, router)
    # py-libp2p starts message seqnos at the current second and adds one per message, so a
    # node restarted after a burst would reuse seqnos: its new messages would be dropped as
    # seen and punished as equivocation. Microseconds never repeat at our rates.
    pubsub.counter = time.time_ns() // 1000
    async with background_trio_service(pubsub), background_trio_service(router):
        with trio.fail_after(READY_TIMEOUT_S):
            await pubsub.wait_until_ready()
        yield PubsubGossip(pubsub, router, scorer)
