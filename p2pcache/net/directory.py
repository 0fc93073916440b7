"""Who has what: the gossip index of other peers' adverts, and our own advertising.

A freshly computed shared answer is announced at once (`announce`: the resolver awaits it
before the answer goes back, so a peer asked next finds the advert); other new shared entries
are batched for `DirectoryConfig.ad_batch_s` into one advert; the whole
inventory (the `Inventory` sources: store entries, KV chunk tips) is re-announced every
`readvertise_s`, and soon after a new peer joins our ad mesh (adverts only reach mesh peers:
one that joined later missed them; at start-up the mesh is empty, so this is also when a
restarted node first announces).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import trio

from p2pcache.identity import Identity
from p2pcache.net.ads import (
    MAX_AD_ENTRIES,
    AdEntry,
    AdValidator,
    GossipIndex,
    Provider,
    ads_topic,
    make_advert,
)
from p2pcache.net.config import DirectoryConfig
from p2pcache.net.gossip import Gossip
from p2pcache.store import Entry, Store

log = logging.getLogger(__name__)

ANNOUNCE_WAIT_S = 1.0
"""`Directory.announce` holds an answer back at most this long for its advert (a slow or stuck
mesh peer must not delay the client; the publish goes on behind)."""


class Inventory(Protocol):
    def inventory(self) -> list[AdEntry]:
        """What to re-announce (blocking: runs in a worker thread)."""
        ...


class StoreInventory:
    """The newest shared `decoder_final` entries of one model in the store."""

    def __init__(
        self, store: Store, model_hash: str, limit: int = DirectoryConfig.readvertise_max
    ) -> None:
        self.store = store
        self.model_hash = model_hash
        self.limit = limit

    def inventory(self) -> list[AdEntry]:
        entries = [
            e
            for e in self.store.iter_entries(self.model_hash)
            if not e.privacy_flag and e.cache_level == "decoder_final"
        ]
        entries.sort(key=lambda e: e.inserted_at, reverse=True)
        return [
            AdEntry(e.cache_level, e.input_sha256, e.size, e.output.sha256())
            for e in entries[: self.limit]
        ]


class Directory:
    """The gossip index (fed by the ad topic's validator) and our advert publisher."""

    def __init__(
        self,
        identity: Identity,
        model_hash: str,
        config: DirectoryConfig | None = None,
        *,
        addrs: Callable[[], list[str]],
        is_banned: Callable[[str], bool],
        inventories: Sequence[Inventory] = (),
        heartbeat_s: float = 1.0,
    ) -> None:
        self.identity = identity
        self.model_hash = model_hash
        self.config = config = config or DirectoryConfig()
        self.topic = ads_topic(model_hash)
        self._addrs = addrs
        self._inventories = tuple(inventories)
        self._heartbeat_s = heartbeat_s  # GossipSub has no mesh-change event: looked at this often
        self.index = GossipIndex()
        self.index.on_change = self._index_changed
        self._index_event = trio.Event()  # set (and replaced) whenever an advert lands
        self.validator = AdValidator(
            model_hash,
            self.index,
            identity.peer_id,
            is_banned=is_banned,
            max_age_s=config.max_ad_age_s,
        )
        self.stats = {
            "adverts": 0,
            "advert_bytes": 0,  # payloads published (each sent to every mesh peer)
            "inventory_rounds": 0,
            "rounds_for_new_mesh_peers": 0,
        }
        self._pending: dict[str, AdEntry] = {}
        self._pending_wake = trio.Event()
        self._seq = 0
        # Set while `run` runs: where `announce` publishes, and the nursery its publish runs in.
        self._gossip: Gossip | None = None
        self._nursery: trio.Nursery | None = None

    # -- the index ------------------------------------------------------------------------
    def providers(self, key: str, level: str = "decoder_final") -> list[Provider]:
        return self.index.providers(key, level)

    def forget(self, key: str, peer_id: str, level: str = "decoder_final") -> None:
        self.index.forget(key, peer_id, level)

    def forget_peer(self, peer_id: str) -> None:
        """Drop every advert of a (banned) peer."""
        self.index.forget_peer(peer_id)

    def changed(self) -> trio.Event:
        return self._index_event

    def producers(self) -> Mapping[str, Sequence[str]]:
        return self.index.addrs

    def _index_changed(self) -> None:
        self._index_event.set()
        self._index_event = trio.Event()

    async def wait_providers(
        self, key: str, level: str = "decoder_final", wait_s: float = 0.0
    ) -> list[str]:
        """Providers of ``key`` in the gossip index, waiting up to ``wait_s`` for the first one."""
        with trio.move_on_after(max(0.0, min(wait_s, 60.0))):
            while not self.index.providers(key, level):
                await self._index_event.wait()
        return [p.peer_id for p in self.index.providers(key, level)]

    # -- advertising ----------------------------------------------------------------------
    def _ad_of(self, entry: Entry) -> AdEntry | None:
        """The ad entry of a shared entry of our model; None for one that never leaves."""
        if entry.privacy_flag or entry.model_hash != self.model_hash:
            return None
        return AdEntry(entry.cache_level, entry.input_sha256, entry.size, entry.output.sha256())

    def advertise(self, entry: Entry) -> None:
        """Queue a shared entry for the next advert batch. Private entries never leave."""
        ad = self._ad_of(entry)
        if ad is None:
            return
        self._pending[entry.input_sha256] = ad
        self._pending_wake.set()

    async def announce(self, entry: Entry, wait_s: float = ANNOUNCE_WAIT_S) -> None:
        """Publish a shared entry's advert now rather than in the next batch, and return once
        it is published (at most ``wait_s``: the publish goes on in the background). For an
        answer just computed: a peer asked right after it was returned must find the advert.
        Before `run` starts it is queued like `advertise`."""
        ad = self._ad_of(entry)
        if ad is None:
            return
        gossip, nursery = self._gossip, self._nursery
        if gossip is None or nursery is None:
            self.advertise(entry)
            return
        self._pending.pop(entry.input_sha256, None)  # queued by the tier: not twice
        done = trio.Event()
        nursery.start_soon(self._publish_now, gossip, ad, done)
        with trio.move_on_after(wait_s):
            await done.wait()

    async def _publish_now(self, gossip: Gossip, ad: AdEntry, done: trio.Event) -> None:
        try:
            await self._publish(gossip, [ad])
        except Exception as exc:  # the next batch tries again
            log.warning("could not announce %s: %r", ad.key[:12], exc)
            self._pending[ad.key] = ad
            self._pending_wake.set()
        finally:
            done.set()

    def advertise_ads(self, ads: Sequence[AdEntry]) -> None:
        """Queue ready-made ad entries (kv_prefix chunk tips, which are not store entries)."""
        for ad in ads:
            self._pending[f"{ad.cache_level}:{ad.key}"] = ad
        if ads:
            self._pending_wake.set()

    def inventory(self) -> list[AdEntry]:
        """Everything we share, for a re-announcement (blocking LMDB scans)."""
        return [ad for source in self._inventories for ad in source.inventory()]

    def _next_seq(self) -> int:
        # Microseconds since the epoch, strictly increasing: survives restarts (no replays).
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    async def _publish(self, gossip: Gossip, entries: list[AdEntry]) -> None:
        step = MAX_AD_ENTRIES // 2
        for i in range(0, len(entries), step):
            ad = make_advert(
                self.identity,
                self.model_hash,
                self._addrs()[:4],
                self._next_seq(),
                entries[i : i + step],
            )
            data = ad.encode()
            await gossip.publish(self.topic, data)
            self.stats["adverts"] += 1
            self.stats["advert_bytes"] += len(data)

    async def _batch(self, gossip: Gossip) -> None:
        while True:
            await self._pending_wake.wait()
            await trio.sleep(self.config.ad_batch_s)
            self._pending_wake = trio.Event()
            batch, self._pending = list(self._pending.values()), {}
            if batch:
                try:
                    await self._publish(gossip, batch)
                except Exception as exc:
                    log.warning("could not publish %d adverts: %r", len(batch), exc)

    async def _readvertise(self, gossip: Gossip) -> None:
        known: set[str] = set()
        early = False  # this round was brought forward by a new mesh peer
        while True:
            inv = await trio.to_thread.run_sync(self.inventory)
            if inv:
                try:
                    await self._publish(gossip, inv)
                    self.stats["inventory_rounds"] += 1
                    self.stats["rounds_for_new_mesh_peers"] += early
                except Exception as exc:
                    log.warning("could not re-advertise: %r", exc)
            sent_at, joined = trio.current_time(), False
            with trio.move_on_after(self.config.readvertise_s) as waited:
                while True:
                    await trio.sleep(self._heartbeat_s)
                    mesh = gossip.mesh(self.topic)
                    joined, known = joined or bool(mesh - known), mesh
                    if (
                        joined
                        and trio.current_time() - sent_at >= self.config.readvertise_min_gap_s
                    ):
                        break
            early = not waited.cancelled_caught

    async def run(
        self, gossip: Gossip, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish on ``gossip`` until cancelled: batched new adverts and re-announcements."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._batch, gossip)
            nursery.start_soon(self._readvertise, gossip)
            self._gossip, self._nursery = gossip, nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._gossip = self._nursery = None
