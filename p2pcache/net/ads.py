"""Signed, batched advertisements of shared cache entries on ``otd/1/ads/<model_hash>``.

An advertisement is a msgpack map signed by the producer's node key::

    {v: 1, model_hash, producer, addrs: [multiaddr], ts: ms, seq: int,
     entries: [[cache_level, key, size, output_sha256], ...], sig}

`AdValidator` is the GossipSub topic validator: it rejects (never forwards, and counts against
the forwarder's GossipSub score) oversize, malformed, unsigned or badly signed ads, ads of
another model and ads whose producer is not the pubsub origin; it ignores (never forwards,
holds nothing against the forwarder: honest relays forward them) stale or future ads, replays
(a sequence number not above the last accepted one from that producer) and ads from banned
peers, unless the producer itself sent them. Accepted ads feed the `GossipIndex`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pcache.errors import AdRejected  # noqa: F401 - re-exported
from p2pcache.identity import Identity
from p2pcache.net.config import DirectoryConfig
from p2pcache.net.peer_keys import canonical, verify_by_peer
from p2pcache.net.scoring import Verdict
from p2pcache.store import now_ms

log = logging.getLogger(__name__)

AD_VERSION = 1
MAX_AD_BYTES = 64 * 1024
MAX_AD_ENTRIES = 512
MAX_ADDRS = 8
MAX_AGE_S = DirectoryConfig.max_ad_age_s  # older ads are stale
MAX_SKEW_S = 60.0  # ads from further in the future are refused
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
LEVELS = ("decoder_final", "kv_prefix")


def ads_topic(model_hash: str) -> str:
    return f"otd/1/ads/{model_hash}"


@dataclass(frozen=True)
class AdEntry:
    cache_level: str
    key: str
    size: int
    output_sha256: str


@dataclass(frozen=True)
class Advert:
    model_hash: str
    producer: str
    addrs: tuple[str, ...]
    ts: int
    seq: int
    entries: tuple[AdEntry, ...]
    sig: bytes = b""

    def payload(self) -> bytes:
        return canonical(
            b"otd-ad-v1",
            self.model_hash,
            self.producer,
            list(self.addrs),
            self.ts,
            self.seq,
            [[e.cache_level, e.key, e.size, e.output_sha256] for e in self.entries],
        )

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": AD_VERSION,
                "model_hash": self.model_hash,
                "producer": self.producer,
                "addrs": list(self.addrs),
                "ts": self.ts,
                "seq": self.seq,
                "entries": [[e.cache_level, e.key, e.size, e.output_sha256] for e in self.entries],
                "sig": self.sig,
            },
            use_bin_type=True,
        )


def make_advert(
    identity: Identity,
    model_hash: str,
    addrs: Sequence[str],
    seq: int,
    entries: Sequence[AdEntry],
    ts: int | None = None,
) -> Advert:
    ad = Advert(
        model_hash,
        identity.peer_id,
        tuple(addrs)[:MAX_ADDRS],
        ts if ts is not None else now_ms(),
        seq,
        tuple(entries),
    )
    return Advert(**{**ad.__dict__, "sig": identity.sign(ad.payload())})


def decode_advert(data: bytes) -> Advert:
    """Parse and type-check an advert (no signature or freshness checks)."""
    if len(data) > MAX_AD_BYTES:
        raise AdRejected(f"oversize: {len(data)} bytes > {MAX_AD_BYTES}")
    try:
        m = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_AD_BYTES,
            max_str_len=MAX_AD_BYTES,
            max_array_len=MAX_AD_ENTRIES * 4,
            max_map_len=32,
        )
    except Exception as exc:
        raise AdRejected(f"malformed: {exc}") from exc
    if not isinstance(m, dict) or m.get("v") != AD_VERSION:
        raise AdRejected("malformed: not a v1 advert")
    try:
        mh, producer, addrs, ts, seq, raw_entries, sig = (
            m["model_hash"],
            m["producer"],
            m["addrs"],
            m["ts"],
            m["seq"],
            m["entries"],
            m["sig"],
        )
    except KeyError as exc:
        raise AdRejected(f"malformed: missing {exc}") from exc
    if not (isinstance(mh, str) and _HEX64.match(mh)) or not isinstance(producer, str):
        raise AdRejected("malformed: model_hash or producer")
    if not (
        isinstance(addrs, list)
        and len(addrs) <= MAX_ADDRS
        and all(isinstance(a, str) and len(a) < 256 for a in addrs)
    ):
        raise AdRejected("malformed: addrs")
    if type(ts) is not int or type(seq) is not int or seq < 0 or not isinstance(sig, bytes):
        raise AdRejected("malformed: ts, seq or sig")
    if not isinstance(raw_entries, list) or not 0 < len(raw_entries) <= MAX_AD_ENTRIES:
        raise AdRejected("malformed: entries")
    entries = []
    for e in raw_entries:
        if not (isinstance(e, list) and len(e) == 4):
            raise AdRejected("malformed: entry")
        level, key, size, osha = e
        if (
            level not in LEVELS
            or not (isinstance(key, str) and _HEX64.match(key))
            or type(size) is not int
            or size < 0
            or not (isinstance(osha, str) and _HEX64.match(osha))
        ):
            raise AdRejected("malformed: entry fields")
        entries.append(AdEntry(level, key, size, osha))
    return Advert(mh, producer, tuple(addrs), ts, seq, tuple(entries), sig)


@dataclass(slots=True)  # one per (key, provider): hundreds of thousands of them at the bound
class Provider:
    peer_id: str
    addrs: tuple[str, ...]
    size: int
    output_sha256: str
    seen_at: float


# The index's bounds. Identities are free to make, so a flood of fresh producers all
# advertising the same keys must cost a bounded amount of memory: at most MAX_PER_KEY providers
# per key (L2 asks at most 4 per lookup; more than 16 known holders of one answer buys
# nothing) and MAX_RECORDS provider records in all (measured: ~0.7 KB a record at worst, each
# on its own key with its own strings: the index stays under ~70 MB whatever is advertised).
MAX_PER_KEY = 16
MAX_RECORDS = 100_000


class GossipIndex:
    """Who has what: key -> providers, from accepted adverts. Bounded:

    - at most ``max_per_key`` providers per key: when a key is full, a new provider takes the
      place of the worst one (lowest ``score``, then least recently heard) only if it ranks
      above it, so a flood of fresh identities displaces only each other and never a provider
      with a better reputation;
    - at most ``max_records`` (key, provider) records and ``max_keys`` keys in all: the least
      recently advertised keys are dropped first;
    - at most ``max_producers`` producers' address lists (least recently heard dropped).

    ``score``: a peer's reputation score (`Reputation.score`); None ranks every peer equal
    (then recency decides)."""

    def __init__(
        self,
        max_keys: int = 100_000,
        max_producers: int = 10_000,
        max_per_key: int = MAX_PER_KEY,
        max_records: int = MAX_RECORDS,
        score: Callable[[str], float] | None = None,
    ) -> None:
        if max_per_key < 1 or max_records < 1:
            raise ValueError("the index bounds must be at least 1")
        self.max_keys = max_keys
        self.max_producers = max_producers
        self.max_per_key = max_per_key
        self.max_records = max_records
        self.score = score
        self._by_key: OrderedDict[tuple[str, str], dict[str, Provider]] = OrderedDict()
        self._records = 0  # sum of len(providers) over the keys
        # Producer -> its advertised addresses, most recently heard last; bounded like the keys
        # (identities are free to make, so a flood of producers must not grow it without end).
        self.addrs: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.on_change: Callable[[], None] | None = None  # e.g. wake waiters for a provider
        self.stats = {"displaced": 0, "refused_full": 0, "keys_dropped": 0}

    @property
    def records(self) -> int:
        """(key, provider) records held: never above ``max_records``."""
        return self._records

    def add(self, ad: Advert) -> None:
        now = time.monotonic()
        if ad.addrs:
            self.addrs[ad.producer] = ad.addrs
            self.addrs.move_to_end(ad.producer)
            while len(self.addrs) > self.max_producers:
                self.addrs.popitem(last=False)
        scores: dict[str, float] = {}  # one score look-up per peer per advert

        def rank(p: Provider) -> tuple[float, float]:
            if p.peer_id not in scores:
                scores[p.peer_id] = self.score(p.peer_id) if self.score is not None else 0.0
            return (scores[p.peer_id], p.seen_at)

        for e in ad.entries:
            k = (e.cache_level, e.key)
            provs = self._by_key.get(k)
            if provs is None:
                provs = self._by_key[k] = {}
            else:
                self._by_key.move_to_end(k)
            new = Provider(ad.producer, ad.addrs, e.size, e.output_sha256, now)
            if ad.producer not in provs and len(provs) >= self.max_per_key:
                worst = min(provs.values(), key=rank)
                if rank(new) <= rank(worst):
                    self.stats["refused_full"] += 1
                    continue
                del provs[worst.peer_id]
                self._records -= 1
                self.stats["displaced"] += 1
            if ad.producer not in provs:
                self._records += 1
            provs[ad.producer] = new
        while len(self._by_key) > self.max_keys or self._records > self.max_records:
            _, dropped = self._by_key.popitem(last=False)
            self._records -= len(dropped)
            self.stats["keys_dropped"] += 1
        if self.on_change is not None:
            self.on_change()

    def providers(self, key: str, level: str = "decoder_final") -> list[Provider]:
        return list(self._by_key.get((level, key), {}).values())

    def forget(self, key: str, peer_id: str, level: str = "decoder_final") -> None:
        """One provider no longer has one key (it answered not_found)."""
        provs = self._by_key.get((level, key))
        if provs is not None and provs.pop(peer_id, None) is not None:
            self._records -= 1

    def forget_peer(self, peer_id: str) -> None:
        for provs in self._by_key.values():
            if provs.pop(peer_id, None) is not None:
                self._records -= 1

    def count_of(self, peer_id: str) -> int:
        """How many keys this peer advertises (as far as we know)."""
        return sum(1 for provs in self._by_key.values() if peer_id in provs)

    def __len__(self) -> int:
        return len(self._by_key)

    def snapshot(self) -> dict[str, Any]:
        peers: dict[str, int] = {}
        for provs in self._by_key.values():
            for p in provs:
                peers[p] = peers.get(p, 0) + 1
        return {
            "keys": len(self._by_key),
            "records": self._records,
            "max_records": self.max_records,
            "max_per_key": self.max_per_key,
            "providers": peers,
            **self.stats,
        }


# How loud a rejection is, by its kind. Honest peers re-send: GossipSub delivers a producer's
# adverts over several routes and out of order, and a message can come again once the seen-cache
# forgot it, so a sequence number not above the last one is routine (debug). Stale adverts come
# from skewed clocks and banned ones are known already (info). The rest can only be a forgery or
# a broken peer (warning).
_LOG_LEVELS = {"replay": logging.DEBUG, "stale": logging.INFO, "banned": logging.INFO}


# Which rejections an honest relay can forward, so that they are ignored (dropped, not
# forwarded, not held against the forwarder) rather than rejected (an invalid message in the
# forwarder's GossipSub score). Each depends on the receiver's state or clock: a relay that
# accepted seq 5 before seq 6 reached it forwards 5 after 6 reached us by another path (and
# GossipSub re-sends recent messages to new peers and on IWANT); its clock may differ; it has
# not banned the producer we banned. Every other rejection is deterministic: the relay ran the
# same check before forwarding, so the message is its doing. So is a stale or replayed advert
# sent first-hand by its producer (an honest one signs each advert fresh, with a new sequence
# number): ignoring those would let any peer make us verify its signatures for free.
IGNORED_KINDS = frozenset({"stale", "replay", "banned"})


def ignored_or_rejected(reason: str, first_hand: bool = False) -> Verdict:
    relayed_ok = rejection_kind(reason) in IGNORED_KINDS and not first_hand
    return Verdict.IGNORE if relayed_ok else Verdict.REJECT


def rejection_kind(reason: str) -> str:
    """The kind of an `AdRejected` reason ("replay: seq 3 <= 5" -> "replay")."""
    return reason.split(":")[0]


def log_rejection(reason: str, via: str) -> None:
    level = _LOG_LEVELS.get(rejection_kind(reason), logging.WARNING)
    log.log(level, "advert rejected (via %s): %s", via, reason)


@dataclass
class AdStats:
    accepted: int = 0
    accepted_bytes: int = 0  # payload bytes of accepted adverts (first copies: others are seen)
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        kind = rejection_kind(reason)
        self.rejected[kind] = self.rejected.get(kind, 0) + 1


class AdValidator:
    """The topic validator (sync, cheap: one Ed25519 verify) and the index feeder."""

    def __init__(
        self,
        model_hash: str,
        index: GossipIndex,
        self_id: str,
        is_banned: Callable[[str], bool] = lambda _p: False,
        max_age_s: float = MAX_AGE_S,
        max_skew_s: float = MAX_SKEW_S,
    ) -> None:
        self.model_hash = model_hash
        self.index = index
        self.self_id = self_id
        self.is_banned = is_banned
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.last_seq: dict[str, int] = {}
        self.stats = AdStats()

    def check(self, data: bytes, origin: str | None, topic: str | None = None) -> Advert:
        """Return the advert if acceptable, else raise `AdRejected` with the reason."""
        if topic is not None and topic != ads_topic(self.model_hash):
            raise AdRejected("wrong-model: topic")
        ad = decode_advert(data)
        if ad.model_hash != self.model_hash:
            raise AdRejected(f"wrong-model: {ad.model_hash[:12]}")
        if origin is not None and ad.producer != origin:
            raise AdRejected("unsigned: producer is not the pubsub origin")
        if not verify_by_peer(ad.producer, ad.sig, ad.payload()):
            raise AdRejected("bad-signature")
        now = time.time() * 1000
        if ad.ts < now - self.max_age_s * 1000:
            raise AdRejected("stale: too old")
        if ad.ts > now + self.max_skew_s * 1000:
            raise AdRejected("stale: from the future")
        if ad.seq <= self.last_seq.get(ad.producer, -1):
            raise AdRejected(f"replay: seq {ad.seq} <= {self.last_seq[ad.producer]}")
        if self.is_banned(ad.producer):
            raise AdRejected("banned")
        return ad

    def accept(self, ad: Advert) -> None:
        self.last_seq[ad.producer] = ad.seq
        if ad.producer != self.self_id:
            self.index.add(ad)
        self.stats.accepted += 1

    def verdict(self, forwarder: object, msg: Any) -> Verdict:
        """The GossipSub verdict on a py-libp2p ``rpc_pb2.Message`` sent by ``forwarder``."""
        from libp2p.peer.id import ID

        try:
            origin = ID(msg.from_id).to_base58() if msg.from_id else None
            if origin is None:
                raise AdRejected("unsigned: no origin")
            topic = msg.topicIDs[0] if len(msg.topicIDs) == 1 else None
            ad = self.check(bytes(msg.data), origin, topic)
        except AdRejected as exc:
            self.stats.reject(str(exc))
            log_rejection(str(exc), str(forwarder)[:16])
            first_hand = isinstance(forwarder, ID) and forwarder.to_bytes() == msg.from_id
            return ignored_or_rejected(str(exc), first_hand)
        except Exception as exc:  # never let a hostile message crash the pubsub loop
            self.stats.reject("malformed")
            log_rejection(f"malformed: {exc!r}", str(forwarder)[:16])
            return Verdict.REJECT
        self.accept(ad)
        self.stats.accepted_bytes += len(msg.data)
        return Verdict.ACCEPT

    def __call__(self, forwarder: object, msg: Any) -> bool:
        """py-libp2p's boolean validator: ``(msg_forwarder, rpc_pb2.Message) -> bool``."""
        return self.verdict(forwarder, msg) is Verdict.ACCEPT
