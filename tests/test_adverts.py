"""Adverts as a swarm sees them: an honest re-sent advert is no warning (forgeries are), and a
freshly computed shared answer is announced before it is returned."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import trio

from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.net.ads import (
    AdEntry,
    AdValidator,
    GossipIndex,
    ads_topic,
    decode_advert,
    make_advert,
)
from p2pcache.net.config import DirectoryConfig
from p2pcache.net.directory import Directory
from p2pcache.resolver import Request, Resolver
from p2pcache.store import Entry, Output

MH = "ab" * 32
DEADLINE_S = 10.0  # every wait below is bounded


def ident(tmp_path: Path, name: str) -> Identity:
    return Identity.load_or_create(tmp_path / name)


def message(producer: Identity, data: bytes) -> SimpleNamespace:
    """A pubsub message as py-libp2p hands it to the topic validator."""
    from libp2p.peer.id import ID

    return SimpleNamespace(
        from_id=ID.from_base58(producer.peer_id).to_bytes(), topicIDs=[ads_topic(MH)], data=data
    )


def levels(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "advert rejected" in r.message]


def test_a_resent_advert_is_debug_and_a_forgery_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    them = ident(tmp_path, "them")
    v = AdValidator(MH, GossipIndex(), ident(tmp_path, "me").peer_id)
    entries = [AdEntry("decoder_final", "01" * 32, 10, "02" * 32)]
    first, second = (make_advert(them, MH, [], seq, entries).encode() for seq in (5, 6))
    caplog.set_level(logging.DEBUG, logger="p2pcache.net.ads")
    assert v("fwd", message(them, second)) and v("fwd", message(them, second)) is False
    assert v("fwd", message(them, first)) is False  # an older one, by a slower route
    assert [lvl for lvl, _ in levels(caplog)] == [logging.DEBUG, logging.DEBUG]
    assert v.stats.rejected == {"replay": 2}  # still counted (/admin/peers shows it)

    caplog.clear()
    forged = msgpack.packb({**msgpack.unpackb(second), "seq": 7}, use_bin_type=True)
    assert v("fwd", message(them, forged)) is False
    assert v("fwd", message(them, b"\x93not a map")) is False
    assert [lvl for lvl, _ in levels(caplog)] == [logging.WARNING, logging.WARNING]
    assert "bad-signature" in levels(caplog)[0][1] and "malformed" in levels(caplog)[1][1]


class FakeGossip:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append(data)

    def mesh(self, topic: str) -> set[str]:
        return set()


def shared_entry(key: str, private: bool = False) -> Entry:
    return Entry(
        input_sha256=key,
        model_hash=MH,
        cache_level="decoder_final",
        output=Output([1, 2], "hi", "stop"),
        params={},
        privacy_flag=private,
        producer="p",
    )


def test_announce_publishes_at_once_not_in_the_next_batch(tmp_path: Path) -> None:
    # A batch window of an hour: only an immediate publish can be seen.
    config = DirectoryConfig(ad_batch_s=3600.0, readvertise_s=3600.0)
    d = Directory(ident(tmp_path, "me"), MH, config, addrs=lambda: [], is_banned=lambda _p: False)
    gossip = FakeGossip()

    async def main() -> None:
        await d.announce(shared_entry("0a" * 32))  # before run: queued for the batch
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(d.run, gossip)
                d.advertise(shared_entry("0b" * 32))  # what the L2 tier's on_stored queues
                await d.announce(shared_entry("0b" * 32))
                await d.announce(shared_entry("0c" * 32, private=True))
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert [[e.key for e in decode_advert(ad).entries] for ad in gossip.published] == [["0b" * 32]]
    assert set(d._pending) == {"0a" * 32}  # announced once: no longer in the batch queue


def test_the_resolver_announces_a_shared_answer_before_returning_it(resolver: Resolver) -> None:
    """L3 awaits each tier's ``on_stored`` before it returns; the L2 tier's announces a
    shared entry at once (`PeerTier.on_stored` -> `Directory.announce`)."""
    from p2pcache.net.tier import PeerTier

    announced: list[Entry] = []

    class Listings:
        async def announce(self, entry: Entry) -> None:
            announced.append(entry)

    class L2:
        level = "L2"

        async def lookup(self, keyed: object) -> None:
            return None

        async def on_stored(self, keyed: object, entry: Entry) -> None:
            await PeerTier.on_stored(self, keyed, entry)  # type: ignore[arg-type]

        listings = Listings()

    saved = resolver.tiers
    resolver.tiers = (*saved, L2())  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=2)

    async def ask(prompt: str, share: bool) -> None:
        await resolver.resolve(Request(prompt=prompt, params=params, share=share))

    try:
        trio.run(ask, "Shared question:", True)
        assert [e.privacy_flag for e in announced] == [False]
        trio.run(ask, "Private question:", False)
        trio.run(ask, "Shared question:", True)  # L0 now: nothing new to announce
        assert len(announced) == 1
    finally:
        resolver.tiers = saved
