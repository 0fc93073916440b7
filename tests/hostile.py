"""Hostile parts for tests/test_net_hostile.py, each run in its own process.

- `sybil_flood`: inside a net_peer (``sybil_flood`` command): fresh identities, each signing a
  valid advert of the same keys, published on the ad topic as GossipSub messages of their own
  (origin = the identity, signed with its key), forwarded by the hostile peer.
- ``python -m tests.hostile blackhole N``: N TCP listeners on 127.0.0.1 that accept and never
  send a byte; prints their ports as one JSON line, runs until stdin closes.
- ``python -m tests.hostile idle HOST PORT N SECONDS SOURCE_IP``: holds N idle TCP connections
  to HOST:PORT from SOURCE_IP, re-opening each one the other side closes, for SECONDS; then
  prints what happened as one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import trio

from p2pcache.identity import Identity
from p2pcache.net.ads import AdEntry, ads_topic, make_advert


async def sybil_flood(pubsub: Any, model_hash: str, keys: Sequence[str], n: int) -> int:
    """Publish ``n`` adverts of ``keys``, each from a fresh identity; returns how many."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    from p2pcache.net.host import key_pair_from_identity

    topic = ads_topic(model_hash)
    entries = [AdEntry("decoder_final", k, 100, "00" * 32) for k in keys]
    # Our own validator would take the adverts into our index: skipped, as a hostile node would.
    saved = pubsub.topic_validators.pop(topic, None)
    try:
        for i in range(n):
            sybil = Identity(Ed25519PrivateKey.generate())
            kp = key_pair_from_identity(sybil)
            ad = make_advert(sybil, model_hash, [f"/ip4/127.0.0.1/tcp/{1000 + i}"], 1, entries)
            msg = rpc_pb2.Message(
                data=ad.encode(),
                topicIDs=[topic],
                from_id=ID.from_pubkey(kp.public_key).to_bytes(),
                seqno=i.to_bytes(8, "big"),
            )
            msg.signature = kp.private_key.sign(
                PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
            )
            msg.key = kp.public_key.serialize()
            await pubsub.push_msg(pubsub.my_id, msg)
            # Paced: py-libp2p drops RPCs past 32 queued per peer, so a burst would mostly
            # be lost on our side. 2,000 adverts still arrive within ~30 s.
            await trio.sleep(0.01)
    finally:
        if saved is not None:
            pubsub.topic_validators[topic] = saved
    return n


def blackhole(n: int) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
    held: list[socket.socket] = []

    def accept(s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            held.append(c)  # never read, never written: a black hole

    for s in socks:
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    print(json.dumps({"ports": [s.getsockname()[1] for s in socks]}), flush=True)
    sys.stdin.read()  # until the test closes our stdin


def idle(host: str, port: int, n: int, seconds: float, source: str) -> dict[str, Any]:
    """Hold ``n`` idle connections; count how the other side ends them."""
    deadline = time.monotonic() + seconds
    opened = refused_at_once = closed_later = 0
    lifetimes: list[float] = []
    live: dict[socket.socket, float] = {}

    def open_one() -> None:
        nonlocal opened
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            return
        s.setblocking(False)
        live[s] = time.monotonic()
        opened += 1

    for _ in range(n):
        open_one()
    import select

    while time.monotonic() < deadline:
        readable, _, _ = select.select(list(live), [], [], 0.2) if live else ([], [], [])
        for s in readable:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                continue  # the node's handshake bytes: never answered
            age = time.monotonic() - live.pop(s)
            s.close()
            lifetimes.append(age)
            if age < 1.0:
                refused_at_once += 1
            else:
                closed_later += 1
        while len(live) < n and time.monotonic() < deadline:
            before = len(live)
            open_one()
            if len(live) == before:
                break
    still_open = len(live)
    for s in live:
        s.close()
    return {
        "opened": opened,
        "refused_at_once": refused_at_once,
        "closed_later": closed_later,
        "max_lifetime_s": max(lifetimes, default=0.0),
        "still_open_at_end": still_open,
    }


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "blackhole":
        blackhole(int(sys.argv[2]))
    elif what == "idle":
        h, p, count, secs, src = sys.argv[2:7]
        print(json.dumps(idle(h, int(p), int(count), float(secs), src)), flush=True)
    else:
        raise SystemExit(f"unknown {what!r}")
    os._exit(0)
