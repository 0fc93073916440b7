"""GossipSub scores under attack, read off py-libp2p's own scorer on the receiving node.

Two cases, each with real peers in separate processes (tests/net_peer.py, no model):

1. a hostile peer X, in V's mesh, publishes ``--invalid`` adverts with bad signatures:
   X's score at V before and after, whether V graylisted it, how many V validated;
2. an honest relay R forwards to V a replayed and a stale advert signed by H (what honest
   relays do routinely): R's score and invalid-message count at V before and after.

    .venv/bin/python bench/bench_gossip_attack.py [--invalid 52]

Prints a table; not a test (tests/test_gossip_swarm.py asserts the same behaviour).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.net_harness import Peer, Peers, until  # noqa: E402

QUIET = ("--readvertise-s", "3600", "--warm-peers", "0")
TIMEOUT_S = 30.0


def score(at: Peer, of: Peer) -> dict[str, Any]:
    s = at.call("gossip_score", peer=of.peer_id)
    s["p4"] = sum(s["invalid"].values())
    return s


def hostile(n_invalid: int) -> list[tuple[str, str, str]]:
    with Peers() as ps:
        v = ps.start(*QUIET)
        x = ps.start(*QUIET, "--bootstrap", v.addr)
        x.call("wait_mesh", n=1)
        v.call("wait_mesh", n=1)
        good = x.call("sign_ad", key="a1" * 32, seq=1)["data_hex"]
        x.call("publish_raw", topic="ads", data_hex=good)
        v.call("wait_provider", key="a1" * 32)
        before = score(v, x)
        ad = msgpack.unpackb(bytes.fromhex(good), raw=False)
        for i in range(n_invalid):
            bad = {**ad, "seq": 2 + i, "sig": bytes([i % 256]) * 64}
            x.call("publish_raw", topic="ads", data_hex=msgpack.packb(bad).hex())
        until(lambda: score(v, x)["graylisted"], TIMEOUT_S, "X graylisted at V")
        after = score(v, x)
        validated = v.call("stats")["ads"]["rejected"].get("bad-signature", 0)
        return [
            ("hostile X: score at V", f"{before['score']:.1f}", f"{after['score']:.1f}"),
            ("hostile X: graylisted", str(before["graylisted"]), str(after["graylisted"])),
            (
                "hostile X: invalid counted (P4, decayed)",
                f"{before['p4']:.2f}",
                f"{after['p4']:.2f}",
            ),
            ("hostile X: bad adverts V validated", "0", f"{validated} of {n_invalid}"),
        ]


def honest_relay() -> list[tuple[str, str, str]]:
    with Peers() as ps:
        h = ps.start(*QUIET)
        r = ps.start(*QUIET, "--bootstrap", h.addr)
        v = ps.start(*QUIET, "--bootstrap", r.addr)
        for p, n in ((h, 1), (r, 2), (v, 1)):
            p.call("wait_mesh", n=n)
        h.call("put_entry", key="b1" * 32)
        v.call("wait_provider", key="b1" * 32)
        before = score(v, r)

        def relay(data_hex: str) -> None:
            msg = h.call("sign_pubsub", topic="ads", data_hex=data_hex)["msg_hex"]
            r.call("forward_raw", peer=v.peer_id, msg_hex=msg)

        relay(h.call("sign_ad", key="b2" * 32, seq=1)["data_hex"])  # a replay (seq below H's)
        hour_ago = int(time.time() * 1000) - 3_600_000
        relay(h.call("sign_ad", key="b3" * 32, seq=2**62, ts=hour_ago)["data_hex"])  # stale
        until(
            lambda: {"replay", "stale"} <= set(v.call("stats")["ads"]["rejected"]),
            TIMEOUT_S,
            "both adverts judged at V",
        )
        after = score(v, r)
        return [
            ("honest relay R: score at V", f"{before['score']:.1f}", f"{after['score']:.1f}"),
            ("honest relay R: invalid counted (P4)", f"{before['p4']:.2f}", f"{after['p4']:.2f}"),
            ("honest relay R: graylisted", str(before["graylisted"]), str(after["graylisted"])),
        ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--invalid", type=int, default=52, help="invalid adverts the hostile peer sends"
    )
    a = ap.parse_args()
    rows = hostile(a.invalid) + honest_relay()
    w = max(len(r[0]) for r in rows)
    print(f"{'':<{w}}  {'before':>10}  {'after':>14}")
    for name, b, af in rows:
        print(f"{name:<{w}}  {b:>10}  {af:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
