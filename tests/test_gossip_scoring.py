"""Score parameters against py-libp2p's own `PeerScorer` arithmetic (no network).

Each test drives the scorer the way the router and pubsub do (``on_invalid_message``,
``penalize_*``, ``on_heartbeat``) and reads its gates, so a sign or scale error in our
parameters (such as a negative P4 weight, which py-libp2p *subtracts*) fails here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.score import PeerScorer

from p2pcache.identity import Identity
from p2pcache.net.ads import AdEntry, AdValidator, GossipIndex, ads_topic, make_advert
from p2pcache.net.gossip import TopicScorer, boolean_verdict, score_params
from p2pcache.net.scoring import GossipScoring, Verdict, decay_per_heartbeat

MH = "ab" * 32
ADS, EVIDENCE = ads_topic(MH), "otd/1/evidence/" + MH
CFG = GossipScoring()


def _peer(n: int) -> ID:
    return ID(bytes([0, 36, 8, 1, 18, 32]) + bytes([n]) * 32)


def _scorer(app: dict[str, float] | None = None, heartbeat_s: float = 1.0) -> TopicScorer:
    apps = app or {}
    params = score_params(CFG, heartbeat_s, lambda p: apps.get(p, 0.0))
    return TopicScorer(params, {ADS: CFG.ads_weight, EVIDENCE: CFG.evidence_weight})


def test_invalid_messages_lower_the_score_and_graylist() -> None:
    s, p = _scorer(), _peer(1)
    assert s.score(p) == 0.0 and not s.is_graylisted(p)
    s.on_invalid_message(p, ADS)
    assert s.score(p) == pytest.approx(-CFG.invalid_weight)  # a penalty, not a reward
    assert s.allow_gossip(p, [ADS])  # at the gossip threshold (-10 >= -10)
    s.on_invalid_message(p, ADS)
    assert not s.allow_gossip(p, [ADS])  # two invalid messages: no more gossip to it
    assert s.allow_publish(p, [ADS]) and not s.is_graylisted(p)
    n = 2
    while not s.is_graylisted(p):
        s.on_invalid_message(p, ADS)
        n += 1
    assert n == 9  # a fresh peer: -90 < -80
    assert s.score(p) < CFG.graylist_threshold
    # py-libp2p's incoming gate (push_msg) is allow_publish: it drops from now on.
    assert not s.allow_publish(p, [ADS]) and not s.allow_publish(p, [EVIDENCE])


def test_the_old_parameters_rewarded_invalid_messages() -> None:
    # What the previous configuration did, in py-libp2p's own scorer: 20 invalid -> +200.
    from libp2p.pubsub.score import ScoreParams, TopicScoreParams

    old = PeerScorer(
        ScoreParams(
            p4_invalid_messages=TopicScoreParams(weight=-10.0, cap=100.0, decay=0.9),
            graylist_threshold=-500.0,
        )
    )
    p = _peer(2)
    for _ in range(20):
        old.on_invalid_message(p, ADS)
    assert old.score(p, [ADS]) == pytest.approx(200.0) and not old.is_graylisted(p, [ADS])


def test_a_peer_with_the_most_credit_is_still_graylisted() -> None:
    p = _peer(3)
    s = _scorer({p.to_base58(): 9.99})  # reputation score near 1
    for topic in (ADS, EVIDENCE):
        for _ in range(50):
            s.on_first_delivery(p, topic)
    assert s.score(p) == pytest.approx(CFG.max_credit(), abs=0.02)
    n = 0
    while not s.is_graylisted(p):
        s.on_invalid_message(p, ADS)
        n += 1
        assert n <= 10
    assert n == 10  # -100 + 15.99 < -80


def test_evidence_weighs_twice_an_advert() -> None:
    s, a, e = _scorer(), _peer(4), _peer(5)
    s.on_invalid_message(a, ADS)
    s.on_invalid_message(e, EVIDENCE)
    assert s.score(e) == pytest.approx(2 * s.score(a)) and s.score(e) < s.score(a) < 0


def test_one_score_over_all_topics_behind_every_gate() -> None:
    # py-libp2p's single-topic gates use that topic alone (and leave out P6): ours do not.
    s, p = _scorer(), _peer(6)
    for _ in range(9):
        s.on_invalid_message(p, ADS)
    assert s.score(p, [EVIDENCE]) == s.score(p, [ADS]) == s.score(p)
    assert not s.allow_publish(p, [EVIDENCE]) and s.is_graylisted(p, [EVIDENCE])


def test_behaviour_penalties_lower_the_score() -> None:
    s, p = _scorer(), _peer(7)
    s.penalize_graft_flood(p, 10.0)  # up to the threshold: free
    assert s.score(p) == 0.0
    s.penalize_iwant_spam(p, 5.0)
    assert s.score(p) == pytest.approx(-5.0 * CFG.behaviour_weight)
    q = _peer(8)
    s.penalize_equivocation(q, 100.0)  # py-libp2p's equivocation penalty graylists
    assert s.is_graylisted(q)


def test_a_banned_peer_is_graylisted_by_its_app_score() -> None:
    banned, fresh, bad = _peer(9), _peer(10), _peer(11)
    # `Reputation.gossip_score`: banned -1000, else 20 x (score - 0.5).
    s = _scorer({banned.to_base58(): -1000.0, bad.to_base58(): 20 * (0.05 - 0.5)})
    assert s.is_graylisted(banned) and not s.allow_publish(banned, [ADS])
    # A poor reputation alone (not banned: 20 x (0.05 - 0.5) = -9) keeps gossip; with one
    # invalid message on top it is under the gossip threshold.
    assert s.allow_gossip(bad, [ADS]) and s.allow_gossip(fresh, [ADS])
    s.on_invalid_message(bad, ADS)
    assert not s.allow_gossip(bad, [ADS]) and not s.is_graylisted(bad)


def test_counters_decay_with_the_configured_half_life() -> None:
    hb = 1.0
    s, p = _scorer(heartbeat_s=hb), _peer(12)
    for _ in range(9):
        s.on_invalid_message(p, ADS)
    assert s.is_graylisted(p)
    beats = int(CFG.invalid_half_life_s / hb)
    for _ in range(beats):
        s.on_heartbeat()
    assert s.heartbeats == beats
    assert s.score(p) == pytest.approx(-45.0, rel=1e-6)  # halved
    assert not s.is_graylisted(p)
    assert decay_per_heartbeat(600.0, 2.0) == pytest.approx(math.pow(0.5, 2 / 600))


def test_a_pardoned_forwarder_is_not_counted() -> None:
    s, p, q = _scorer(), _peer(13), _peer(14)
    s.pardon(p)
    s.on_invalid_message(p, ADS)
    assert s.score(p) == 0.0
    s.on_invalid_message(p, ADS)  # one pardon, one message
    assert s.score(p) < 0
    s.pardon(p)
    s.on_invalid_message(q, ADS)  # another peer's invalid message is counted
    assert s.score(q) < 0


def _msg(data: bytes, origin: Identity, topic: str = ADS) -> Any:
    return rpc_pb2.Message(
        data=data, topicIDs=[topic], from_id=ID.from_base58(origin.peer_id).to_bytes()
    )


def test_advert_verdicts(tmp_path: Path) -> None:
    me = Identity.load_or_create(tmp_path / "me.key")
    them = Identity.load_or_create(tmp_path / "them.key")
    v = AdValidator(MH, GossipIndex(), me.peer_id)
    e = [AdEntry("decoder_final", "01" * 32, 10, "02" * 32)]
    fwd = _peer(15)
    assert v.verdict(fwd, _msg(make_advert(them, MH, [], 10, e).encode(), them)) is Verdict.ACCEPT
    ignored = {
        "replay": make_advert(them, MH, [], 9, e).encode(),
        "stale": make_advert(them, MH, [], 11, e, ts=1).encode(),
        "future": make_advert(them, MH, [], 12, e, ts=2**50).encode(),
    }
    for what, data in ignored.items():
        assert v.verdict(fwd, _msg(data, them)) is Verdict.IGNORE, what
    # ... unless its producer sent it first-hand: then it is its own doing (and ignoring it
    # would let a peer make us verify signatures for free).
    producer = ID.from_base58(them.peer_id)
    for what, data in ignored.items():
        assert v.verdict(producer, _msg(data, them)) is Verdict.REJECT, what
    rejected = {
        "malformed": b"\x93nope",
        "bad-signature": make_advert(me, MH, [], 13, e).encode(),  # not signed by its origin
        "wrong-model": make_advert(them, "cd" * 32, [], 14, e).encode(),
    }
    for what, data in rejected.items():
        assert v.verdict(fwd, _msg(data, them)) is Verdict.REJECT, what
    banned = AdValidator(MH, GossipIndex(), me.peer_id, is_banned=lambda p: True)
    data = make_advert(them, MH, [], 20, e).encode()
    assert banned.verdict(fwd, _msg(data, them)) is Verdict.IGNORE


def test_boolean_verdict_ignores_a_banned_origin(tmp_path: Path) -> None:
    accuser = Identity.load_or_create(tmp_path / "a.key")
    msg = _msg(b"x", accuser, EVIDENCE)
    fwd = _peer(16)
    assert boolean_verdict(lambda f, m: True, lambda p: True)(fwd, msg) is Verdict.ACCEPT
    assert boolean_verdict(lambda f, m: False, lambda p: False)(fwd, msg) is Verdict.REJECT
    banned = boolean_verdict(lambda f, m: False, lambda p: p == accuser.peer_id)
    assert banned(fwd, msg) is Verdict.IGNORE
