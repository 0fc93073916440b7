"""KV chunks in named databases of the node's LMDB environment (`Store.env`, an `LmdbEnv`).

- ``kv_chunks``: chunk hash (32 bytes) -> ``version | xxh3-128(hash || payload) | u32 tokens |
  payload``. The checksum is xxh3 rather than blake2b because a 2k-token restore reads ~38 MB
  and blake2b alone would take ~50 ms of a ~100 ms budget (xxh3: ~4 ms). It guards against
  corruption; trust in a peer's chunks is the reputation layer's job.
- ``kv_use``:    chunk hash -> u64 last use (ms) | u32 depth (chunk index in its chain).
  Eviction drops the least recently used chunks first and, among chunks used at the same
  time, the deepest first: a chain's tail is worthless without its head, and the head serves
  every longer prefix. A store never evicts a chunk worth more than the one it would make
  room for (so a long prompt cannot push out its own head), and stores only the head of a
  prefix that does not fit the cap. Uses are buffered in memory and written with the next
  store (a restore must not pay an fsync).
- ``kv_meta``:   counters, updated in the same transaction as the data they count.
- ``kv_shared``: chunk hash -> empty: the chunk may be advertised and served to peers. Only a
  shared request (or a fetch for one) marks its prompt's chunks; an unmarked chunk is private
  (so a chunk of a private request stays private unless a shared request has the same
  prefix, whose owner chose to share those tokens). The mark goes with the chunk on eviction.

Dropping a chunk in the middle of a chain only shortens the prefixes found through it: a
lookup walks the chain from the start and stops at the first missing or corrupt chunk.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import lmdb
import xxhash

from p2pcache.errors import CorruptChunk  # noqa: F401 - re-exported
from p2pcache.store import Store
from p2pcache.store.lmdb_env import Counters, Schema, now_ms, unpack_u64

log = logging.getLogger(__name__)

T = TypeVar("T")
_VERSION = 1
_HEAD = struct.Struct("<B16sI")
_USE = struct.Struct("<QI")  # last use (ms), depth in the chain

COUNTERS = (
    "chunks",
    "bytes",
    "chunk_puts",
    "logical_bytes",
    "evictions",
    "corrupt_dropped",
    "lookups",
    "lookup_hits",
    "lookup_tokens",
    "restored_tokens",
)
SCHEMA = Schema("kv", ("kv_chunks", "kv_use", "kv_meta", "kv_shared"))


@dataclass(frozen=True)
class KvStats:
    chunks: int
    bytes: int
    chunk_puts: int  # chunks offered for storage (new or already present)
    logical_bytes: int  # bytes those offers would have taken without dedup
    evictions: int
    corrupt_dropped: int
    lookups: int  # L3 requests that looked for a stored prefix
    lookup_hits: int  # ... and restored one
    lookup_tokens: int  # prompt tokens those requests had
    restored_tokens: int  # ... of which came from stored chunks
    size_cap: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.bytes if self.bytes else 1.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.lookup_hits / self.lookups if self.lookups else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.restored_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


def _use(at_ms: int, depth: int) -> bytes:
    return _USE.pack(at_ms, depth)


def _last_use(v: bytes | memoryview) -> tuple[int, int]:
    """(last use ms, depth) of a ``kv_use`` value."""
    if len(v) >= _USE.size:
        at, depth = _USE.unpack_from(v, 0)
        return at, depth
    return unpack_u64(v), 0  # an 8-byte value of an older store: no depth


def _rank(v: bytes) -> tuple[int, int]:
    """Eviction order: lowest first (oldest use, then deepest chunk)."""
    at, depth = _last_use(v)
    return at, -depth


@dataclass(frozen=True)
class NewChunk:
    """A chunk to store: its chain hash, its index in the chain, its token count, payload."""

    hash: bytes
    depth: int
    n_tokens: int
    payload: bytes | memoryview


def frame(h: bytes, n_tokens: int, payload: bytes | memoryview) -> bytes:
    digest = xxhash.xxh3_128(h)
    digest.update(payload)
    return _HEAD.pack(_VERSION, digest.digest(), n_tokens) + bytes(payload)


def unframe(h: bytes, raw: bytes | memoryview) -> memoryview:
    mv = memoryview(raw)
    if len(mv) < _HEAD.size:
        raise CorruptChunk("chunk shorter than its header")
    version, digest, _ = _HEAD.unpack_from(mv, 0)
    if version != _VERSION:
        raise CorruptChunk(f"unknown chunk version {version}")
    payload = mv[_HEAD.size :]
    check = xxhash.xxh3_128(h)
    check.update(payload)
    if check.digest() != digest:
        raise CorruptChunk("checksum mismatch")
    return payload


class KvChunkStore:
    """Chunk payloads by hash, with a byte cap of its own (LRU eviction)."""

    def __init__(self, store: Store, size_cap: int | None = None) -> None:
        self.store = store
        self.env = store.env
        # Default: half the store's cap, so entries and chunks together stay well inside the
        # LMDB map (2x the store cap).
        self.size_cap = int(size_cap if size_cap is not None else store.size_cap // 2)
        dbs = self.env.open(SCHEMA)
        self._chunks = dbs["kv_chunks"]
        self._use = dbs["kv_use"]
        self._meta = dbs["kv_meta"]
        self._shared = dbs["kv_shared"]
        self._counters = Counters(self._meta)
        self._lock = threading.Lock()
        self._pending_use: dict[bytes, tuple[int, int]] = {}
        self._pending_counts: dict[str, int] = {}
        self.env.on_close(self.flush)  # buffered uses and lookup counters

    # -- reads -------------------------------------------------------------------------
    def read_prefix(
        self, hashes: Sequence[bytes], expected_bytes: int, consume: Callable[[list[memoryview]], T]
    ) -> tuple[int, T | None]:
        """Find the longest run of chunks 0..n-1 that are present and intact and hand their
        payloads to ``consume`` while the read transaction is open (zero-copy views of the
        memory map: a restore copies each byte once, into llama.cpp's state buffer).
        A corrupt chunk (or one of the wrong size) is dropped and ends the prefix there.
        Returns (n, consume's result), or (0, None) when no chunk was found."""
        bad: list[tuple[bytes, str]] = []
        result: T | None = None
        with self.env.begin(db=self._chunks, buffers=True) as txn:
            payloads: list[memoryview] = []
            for h in hashes:
                raw = txn.get(h)
                if raw is None:
                    break
                try:
                    payload = unframe(h, raw)
                    if len(payload) != expected_bytes:
                        raise CorruptChunk(
                            f"{len(payload)} payload bytes, expected {expected_bytes}"
                        )
                except CorruptChunk as exc:
                    bad.append((h, str(exc)))
                    break
                payloads.append(payload)
            n = len(payloads)
            if n:
                result = consume(payloads)
            del payloads  # views into the map must not outlive the transaction
        for h, reason in bad:
            self._drop_corrupt(h, reason)
        if n:
            t = now_ms()
            with self._lock:
                for depth, h in enumerate(hashes[:n]):
                    self._pending_use[h] = (t, depth)
        return n, result

    def present(self, hashes: Sequence[bytes]) -> list[bool]:
        with self.env.begin(db=self._chunks) as txn:
            return [txn.get(h) is not None for h in hashes]

    def shared_payloads(self, hashes: Sequence[bytes], expected_bytes: int) -> list[bytes] | None:
        """Copies of the payloads of ``hashes`` if every one is stored, intact and shared
        (what a peer may be served), else None: a private chunk looks like an absent one."""
        out: list[bytes] = []
        with self.env.begin(buffers=True) as txn:
            for h in hashes:
                raw = txn.get(h, db=self._chunks)
                if raw is None or txn.get(h, db=self._shared) is None:
                    return None
                try:
                    payload = unframe(h, raw)
                except CorruptChunk:
                    return None
                if len(payload) != expected_bytes:
                    return None
                out.append(bytes(payload))
        return out

    def shared_tips(self, limit: int) -> list[tuple[bytes, int]]:
        """(hash, depth) of up to ``limit`` shared chunks, most recently used first: every
        shared chunk names a prefix a peer can fetch (the advertised inventory)."""
        rows: list[tuple[int, bytes, int]] = []
        with self.env.begin() as txn:
            for k, _ in txn.cursor(db=self._shared):
                use = txn.get(k, db=self._use)
                if use is None or txn.get(k, db=self._chunks) is None:
                    continue
                at, depth = _last_use(use)
                rows.append((at, bytes(k), depth))
        rows.sort(reverse=True)
        return [(h, d) for _, h, d in rows[:limit]]

    def mark_shared(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Mark the stored ones of ``hashes`` shareable; returns those newly marked."""
        new: list[bytes] = []
        with self.env.begin(write=True) as txn:
            for h in hashes:
                if txn.get(h, db=self._chunks) is not None and txn.get(h, db=self._shared) is None:
                    txn.put(h, b"", db=self._shared)
                    new.append(h)
        return new

    def drop(self, hashes: Sequence[bytes]) -> int:
        """Delete chunks (e.g. a peer's chunks that failed a spot-check). Returns how many."""
        n = 0
        with self.env.begin(write=True) as txn:
            for h in hashes:
                raw = txn.get(h, db=self._chunks)
                txn.delete(h, db=self._use)
                txn.delete(h, db=self._shared)
                if raw is not None:
                    txn.delete(h, db=self._chunks)
                    self._counters.add(txn, "chunks", -1)
                    self._counters.add(txn, "bytes", -len(raw))
                    n += 1
        return n

    def count_lookup(self, prompt_tokens: int, restored_tokens: int) -> None:
        with self._lock:
            c = self._pending_counts
            c["lookups"] = c.get("lookups", 0) + 1
            c["lookup_hits"] = c.get("lookup_hits", 0) + (1 if restored_tokens else 0)
            c["lookup_tokens"] = c.get("lookup_tokens", 0) + prompt_tokens
            c["restored_tokens"] = c.get("restored_tokens", 0) + restored_tokens

    # -- writes ------------------------------------------------------------------------
    def put_many(
        self, chunks: Sequence[NewChunk], offered_bytes: int, used_at: int | None = None
    ) -> int:
        """Store new chunks (in chain order) in one transaction, stamped as used at
        ``used_at`` (ms; the request's lookup time, so its restored head and its new tail
        rank as one use). Counts ``offered_bytes`` (every chunk of the prefix, stored or
        already present) towards the dedup ratio. Returns bytes added. Raises lmdb.Error;
        the caller logs and goes on."""
        with self._lock:
            uses, self._pending_use = self._pending_use, {}
            counts, self._pending_counts = self._pending_counts, {}
        framed = [(c.hash, c.depth, frame(c.hash, c.n_tokens, c.payload)) for c in chunks]
        at = now_ms() if used_at is None else used_at
        for attempt in range(2):
            try:
                return self._put(framed, at, uses, counts, len(chunks), offered_bytes, attempt > 0)
            except lmdb.MapFullError:
                log.warning("LMDB map full while storing KV chunks; evicting harder")
        return 0

    def _put(
        self,
        framed: list[tuple[bytes, int, bytes]],
        at: int,
        uses: dict[bytes, tuple[int, int]],
        counts: dict[str, int],
        n_offered: int,
        offered_bytes: int,
        aggressive: bool,
    ) -> int:
        added = 0
        with self.env.begin(write=True) as txn:
            for h, (t, depth) in uses.items():
                if txn.get(h, db=self._chunks) is not None:
                    txn.put(h, _use(t, depth), db=self._use)
            for name, delta in counts.items():
                self._counters.add(txn, name, delta)
            total = self._counters.get(txn, "bytes")
            cap = min(self.size_cap, int(total * 0.75)) if aggressive else self.size_cap
            if aggressive:  # the map is full: free a quarter of what is stored first
                total = self._evict(txn, total, cap, None)
            victims: list[tuple[tuple[int, int], bytes]] | None = None
            for h, depth, value in framed:
                if txn.get(h, db=self._chunks) is not None:
                    txn.put(h, _use(at, depth), db=self._use)
                    continue
                if total + len(value) > cap:
                    if victims is None:  # least valuable first; a full scan, see _evict
                        victims = self._victims(txn)
                    total = self._evict(txn, total, cap - len(value), (at, -depth), victims)
                    if total + len(value) > cap:
                        # Everything left is worth more than this chunk (and the chunks after
                        # it in the chain, which are deeper): store only the head.
                        break
                txn.put(h, value, db=self._chunks)
                txn.put(h, _use(at, depth), db=self._use)
                self._counters.add(txn, "chunks", 1)
                self._counters.add(txn, "bytes", len(value))
                total += len(value)
                added += len(value)
            self._counters.add(txn, "chunk_puts", n_offered)
            self._counters.add(txn, "logical_bytes", offered_bytes)
        return added

    def flush(self) -> None:
        """Write buffered uses and lookup counters (statistics only)."""
        try:
            self.put_many([], 0)
        except lmdb.Error as exc:
            log.warning("could not record kv statistics: %s", exc)

    def purge(self) -> int:
        with self.env.begin(write=True) as txn:
            n = self._counters.get(txn, "chunks")
            txn.drop(self._chunks, delete=False)
            txn.drop(self._use, delete=False)
            txn.drop(self._meta, delete=False)
            txn.drop(self._shared, delete=False)
        return n

    def stats(self) -> KvStats:
        self.flush()
        with self.env.begin() as txn:
            c = self._counters.read(txn, COUNTERS)
        return KvStats(size_cap=self.size_cap, **c)

    # -- internals ---------------------------------------------------------------------
    def _victims(self, txn: lmdb.Transaction) -> list[tuple[tuple[int, int], bytes]]:
        """Every chunk by eviction rank, the least valuable last (for pop())."""
        rows = ((_rank(bytes(v)), bytes(k)) for k, v in txn.cursor(db=self._use))
        return sorted(rows, reverse=True)

    def _evict(
        self,
        txn: lmdb.Transaction,
        total: int,
        target: int,
        worth: tuple[int, int] | None,
        victims: list[tuple[tuple[int, int], bytes]] | None = None,
    ) -> int:
        """Drop chunks, least valuable first, until ``total <= target``; with ``worth``,
        only chunks ranked below it. Returns the new total. A full scan of kv_use: chunks
        are large (hundreds of KB), so even a big store has few of them."""
        if victims is None:
            victims = self._victims(txn)
        while total > target and victims:
            rank, h = victims[-1]
            if worth is not None and rank >= worth:
                break
            victims.pop()
            raw = txn.get(h, db=self._chunks)
            txn.delete(h, db=self._use)
            txn.delete(h, db=self._shared)
            if raw is None:
                continue
            txn.delete(h, db=self._chunks)
            total -= len(raw)
            self._counters.add(txn, "chunks", -1)
            self._counters.add(txn, "bytes", -len(raw))
            self._counters.add(txn, "evictions", 1)
        return total

    def _drop_corrupt(self, h: bytes, reason: str) -> None:
        log.error("corrupt KV chunk %s dropped (%s); prefilling instead", h.hex()[:16], reason)
        try:
            with self.env.begin(write=True) as txn:
                raw = txn.get(h, db=self._chunks)
                if raw is not None:
                    txn.delete(h, db=self._chunks)
                    txn.delete(h, db=self._use)
                    txn.delete(h, db=self._shared)
                    self._counters.add(txn, "chunks", -1)
                    self._counters.add(txn, "bytes", -len(raw))
                    self._counters.add(txn, "corrupt_dropped", 1)
        except lmdb.Error as exc:
            log.warning("could not drop corrupt chunk: %s", exc)
