"""GossipSub peer-score parameters, and the three-way verdict of our topic validators.

Shaped after the GossipSub v1.1 evaluation's configuration (thresholds gossip -10, graylist -80;
invalid messages strongly negative; behaviour penalties on; per-topic weights), fitted to what
py-libp2p 0.8.1's `PeerScorer` computes. Its arithmetic, which the weights below are chosen for:

- every term is linear (the spec squares P3 and P4): ``score = sum_topics topic_weight *
  (w2*min(P2, cap2) - w4*min(P4, cap4)) - w5*(P5 - threshold5)+ + w6*app``; P4 and P5 weights
  are *subtracted*, so they are positive here;
- P1 counts GRAFTs, not time in the mesh (it would reward mesh churn): off;
- P3 (mesh delivery deficit) is never updated by the router: off. Its job, telling a peer
  that takes and does not give, falls to the application score (P6): our reputation of the
  peer from real fetches (`Reputation.gossip_score`: in (-10, 10), -1000 once banned);
- counters only decay geometrically once per heartbeat, never to zero: the decays below are
  derived from half-lives and the heartbeat;
- incoming messages are dropped by the *publish* gate (the spec's graylist), while outgoing
  ones already need the stricter *gossip* threshold (its mesh filter), so the publish
  threshold is set to the graylist threshold: a peer's messages are ignored exactly once it is
  graylisted, and the invalid messages it sent until then were all counted;
- P7 (IP colocation) is off: clusters on one host or behind one NAT are normal here.

With these numbers a fresh peer is graylisted by its 9th invalid message (-90), one with the
most credit it can earn (P2 capped on both topics, reputation near 1: +16) by its 10th; two
invalid messages put a fresh peer under the gossip threshold (no more gossip to it). Until it
is graylisted every message of a peer is validated (and counted): a handful of bad messages
costs it its gossip, not yet a hearing. The
behaviour penalties py-libp2p applies (GRAFT flood 10, IHAVE/IWANT spam 5, equivocation 100)
are free up to 10, then cost one point each: an equivocation graylists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    """A topic validator's answer (GossipSub v1.1's accept / ignore / reject)."""

    ACCEPT = "accept"  # delivered and forwarded
    IGNORE = "ignore"  # dropped, not forwarded, nothing held against the forwarder
    REJECT = "reject"  # dropped, and counted as an invalid message (P4) of the forwarder


@dataclass(frozen=True)
class GossipScoring:
    """Peer-score weights and thresholds (see the module docstring for the arithmetic)."""

    gossip_threshold: float = -10.0
    publish_threshold: float = -80.0  # = graylist: py-libp2p's incoming-message gate
    graylist_threshold: float = -80.0
    # P2: first deliveries of valid messages, a little credit for useful relays.
    first_delivery_weight: float = 0.2
    first_delivery_cap: float = 10.0
    first_delivery_half_life_s: float = 60.0
    # P4: invalid messages. Honest nodes validate with the same rules before forwarding, so an
    # invalid message is the forwarder's doing (what an honest relay may forward is IGNOREd).
    invalid_weight: float = 10.0
    invalid_cap: float = 100.0
    invalid_half_life_s: float = 600.0
    # P5: py-libp2p's behaviour penalties.
    behaviour_weight: float = 1.0
    behaviour_threshold: float = 10.0
    behaviour_half_life_s: float = 300.0
    # P6: our reputation of the peer.
    app_weight: float = 1.0
    # Topic weights. Evidence is rare and an invalid piece is a forged accusation (an attempt
    # to get an honest peer banned): it weighs twice an invalid advert.
    ads_weight: float = 1.0
    evidence_weight: float = 2.0

    def max_credit(self) -> float:
        """The most positive score a peer can hold (P2 capped on both topics, best P6)."""
        p2 = self.first_delivery_weight * self.first_delivery_cap
        return p2 * (self.ads_weight + self.evidence_weight) + 10.0 * self.app_weight


def decay_per_heartbeat(half_life_s: float, heartbeat_s: float) -> float:
    """The per-heartbeat factor that halves a counter every ``half_life_s``."""
    return float(0.5 ** (heartbeat_s / half_life_s))
