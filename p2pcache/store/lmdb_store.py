"""The entry store: the first tenant of the data dir's LMDB environment (`LmdbEnv`).

Layout (named databases of the environment, each write one short transaction):

- ``entries``: input_sha256 (32 raw bytes) -> framed, checksummed msgpack `Entry`.
- ``evict``:   priority (8 bytes, big-endian ms) || input_sha256 -> b"". Walked from the
  lowest priority when the size cap is reached. Priority is the last use plus a bonus that
  grows with log2(hits): frequently used entries outlive merely recent ones.
- ``meta``:    counters (8-byte little-endian), updated in the same transaction as the data
  they count, so they stay consistent after a crash.

Durability: LMDB commits are atomic and, with ``durable=True`` (the default), fsynced; a
process killed at any moment leaves the last committed state. Hit counts are advisory and
buffered in memory (flushed every few seconds, on writes and on close) so that a cache hit
costs a read transaction, not an fsync.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from p2pcache.errors import EntryTooLarge, StoreError  # noqa: F401 - re-exported
from p2pcache.store.lmdb_env import Counters, LmdbEnv, Schema, now_ms
from p2pcache.store.records import CorruptValue, Entry, decode_entry, encode_entry

log = logging.getLogger(__name__)

GiB = 1024**3
DEFAULT_SIZE_CAP = 4 * GiB
HIT_BONUS_MS = 3_600_000  # each doubling of hits is worth one hour of recency
_HIT_FLUSH_COUNT = 256
_HIT_FLUSH_SECONDS = 5.0

COUNTERS = ("entries", "bytes", "inserts", "evictions", "corrupt_dropped", "hits", "misses")
SCHEMA = Schema("store", ("entries", "evict", "meta"))


@dataclass(frozen=True)
class StoreStats:
    path: str
    size_cap: int
    entries: int
    bytes: int
    inserts: int
    evictions: int
    corrupt_dropped: int
    hits: int
    misses: int
    file_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _key(input_sha256: str) -> bytes:
    try:
        k = bytes.fromhex(input_sha256)
    except ValueError:
        k = b""
    if len(k) != 32:
        raise KeyError(f"not a sha256 hex key: {input_sha256!r}")
    return k


def _priority(entry: Entry) -> int:
    last = max(entry.inserted_at, entry.last_hit_at)
    return last + int(HIT_BONUS_MS * math.log2(1 + entry.hits))


def _evict_key(entry: Entry, k: bytes) -> bytes:
    return _priority(entry).to_bytes(8, "big") + k


def _encode_sized(entry: Entry) -> bytes:
    """Encode with ``entry.size`` equal to the encoded length (a fixed point: the size
    field's own width can change the length, so iterate until it settles)."""
    value = encode_entry(entry)
    while entry.size != len(value):
        entry.size = len(value)
        value = encode_entry(entry)
    return value


class Store:
    """Entries of every model in the LMDB environment under ``path``, which it opens and owns:
    the other tenants (KV chunks, reputation, the semantic index) open their databases through
    ``store.env`` and are flushed when the store closes.

    Thread-safe: each call opens its own short transaction; the hit buffer has a lock.
    """

    def __init__(
        self,
        path: str | Path,
        size_cap: int = DEFAULT_SIZE_CAP,
        durable: bool = True,
        map_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.size_cap = int(size_cap)
        # The map is only address space; 2x the cap leaves room for LMDB's free pages.
        # A smaller map_size models a disk that fills up before the cap is reached.
        map_size = map_size or max(2 * self.size_cap, 256 * 1024**2)
        # Copy-on-write B-trees and free pages need headroom: counted bytes stay under half
        # the map, or a full map could refuse even the deletes that eviction needs.
        self._byte_budget = min(self.size_cap, map_size // 2)
        self.env = LmdbEnv(self.path, map_size=map_size, durable=durable)
        dbs = self.env.open(SCHEMA)
        self._entries = dbs["entries"]
        self._evict = dbs["evict"]
        self._counters = Counters(dbs["meta"])
        self._hits_lock = threading.Lock()
        self._pending_hits: dict[bytes, int] = {}  # key -> last hit ms
        self._pending_hit_counts: dict[bytes, int] = {}
        self._pending_misses = 0
        self._last_flush = time.monotonic()
        self.env.on_close(self.flush_hits)

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Flush every tenant's buffered writes (hit counts among them) and close LMDB."""
        self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------
    def get(self, input_sha256: str) -> Entry | None:
        """The entry for this key, or None. A corrupt value is dropped, never returned."""
        k = _key(input_sha256)
        with self.env.begin(db=self._entries) as txn:
            raw = txn.get(k)
        if raw is None:
            return None
        try:
            return decode_entry(raw)
        except CorruptValue as exc:
            self._drop_corrupt(k, str(exc))
            return None

    def contains(self, input_sha256: str) -> bool:
        with self.env.begin(db=self._entries) as txn:
            return txn.get(_key(input_sha256)) is not None

    def iter_entries(self, model_hash: str | None = None) -> Iterator[Entry]:
        """Every readable entry (optionally of one model); corrupt ones are dropped."""
        corrupt: list[tuple[bytes, str]] = []
        with self.env.begin(db=self._entries) as txn:
            for k, raw in txn.cursor():
                try:
                    entry = decode_entry(raw)
                except CorruptValue as exc:
                    corrupt.append((bytes(k), str(exc)))
                    continue
                if model_hash is None or entry.model_hash == model_hash:
                    yield entry
        for k, reason in corrupt:
            self._drop_corrupt(k, reason)

    def verify(self) -> int:
        """Check every value's checksum; drop corrupt ones. Returns how many were dropped."""
        before = self.stats().corrupt_dropped
        for _ in self.iter_entries():
            pass
        return self.stats().corrupt_dropped - before

    # -- hits ------------------------------------------------------------------------
    def record_hit(self, input_sha256: str) -> None:
        k = _key(input_sha256)
        with self._hits_lock:
            self._pending_hits[k] = now_ms()
            self._pending_hit_counts[k] = self._pending_hit_counts.get(k, 0) + 1
            due = (
                len(self._pending_hits) >= _HIT_FLUSH_COUNT
                or time.monotonic() - self._last_flush > _HIT_FLUSH_SECONDS
            )
        if due:
            self.flush_hits()

    def record_miss(self) -> None:
        with self._hits_lock:
            self._pending_misses += 1

    def flush_hits(self) -> None:
        """Write buffered hit counts (advisory statistics) in one transaction."""
        with self._hits_lock:
            last, counts = self._pending_hits, self._pending_hit_counts
            misses = self._pending_misses
            self._pending_hits, self._pending_hit_counts, self._pending_misses = {}, {}, 0
            self._last_flush = time.monotonic()
        if not last and not misses:
            return
        try:
            with self.env.begin(write=True) as txn:
                for k, at in last.items():
                    raw = txn.get(k, db=self._entries)
                    if raw is None:
                        continue  # evicted or purged meanwhile
                    try:
                        entry = decode_entry(raw)
                    except CorruptValue:
                        continue  # the next read drops and reports it
                    txn.delete(_evict_key(entry, k), db=self._evict)
                    entry.hits += counts[k]
                    entry.last_hit_at = max(entry.last_hit_at, at)
                    value = _encode_sized(entry)
                    txn.put(k, value, db=self._entries)
                    txn.put(_evict_key(entry, k), b"", db=self._evict)
                    self._counters.add(txn, "bytes", len(value) - len(raw))
                self._counters.add(txn, "hits", sum(counts.values()))
                self._counters.add(txn, "misses", misses)
        except lmdb.Error as exc:
            log.warning("could not record cache hits (statistics only): %s", exc)

    # -- writes ----------------------------------------------------------------------
    def put(self, entry: Entry) -> Entry:
        """Insert or replace an entry, evicting by use to stay under the size cap."""
        k = _key(entry.input_sha256)
        value = _encode_sized(entry)
        if len(value) > self._byte_budget:
            raise EntryTooLarge(
                f"entry of {len(value)} bytes exceeds the store's budget of {self._byte_budget}"
            )
        self.flush_hits()
        # LMDB reuses freed pages only after the freeing transaction commits, so when the map
        # (the disk budget) is full we evict in a transaction of its own, then retry.
        for free_fraction in (0.0, 0.1, 0.25, 0.5):
            if free_fraction:
                self._evict_fraction(free_fraction)
            try:
                with self.env.begin(write=True) as txn:
                    self._remove(txn, k)
                    self._make_room(txn, len(value))
                    txn.put(k, value, db=self._entries)
                    txn.put(_evict_key(entry, k), b"", db=self._evict)
                    self._counters.add(txn, "entries", 1)
                    self._counters.add(txn, "bytes", len(value))
                    self._counters.add(txn, "inserts", 1)
                return entry
            except lmdb.MapFullError:
                log.warning("LMDB map full; evicting and retrying")
            except lmdb.Error as exc:  # e.g. ENOSPC at commit: the transaction is aborted
                hint = self._disk_hint(len(value))
                raise StoreError(f"could not store entry: {exc}{hint}") from exc
        raise StoreError("store is full even after evicting half of it")

    def _disk_hint(self, need: int) -> str:
        # LMDB reports a short write as EIO; say what the operator should look at.
        free = shutil.disk_usage(self.path).free
        if free >= 4 * need + (1 << 20):
            return ""
        return f" (disk full: {free} bytes free at {self.path})"

    def _evict_fraction(self, fraction: float) -> None:
        try:
            with self.env.begin(write=True) as txn:
                total = self._counters.get(txn, "bytes")
                self._evict_down_to(txn, int(total * (1 - fraction)))
        except lmdb.MapFullError:  # deleting needs a few pages too; nothing more to do
            log.error("LMDB map full even for eviction")

    def delete(self, input_sha256: str) -> bool:
        with self.env.begin(write=True) as txn:
            return self._remove(txn, _key(input_sha256))

    def purge(self, model_hash: str | None = None) -> int:
        """Delete every entry (of one model, if given). Returns how many were deleted."""
        self.flush_hits()
        keys = (
            [bytes.fromhex(e.input_sha256) for e in self.iter_entries(model_hash)]
            if model_hash
            else None
        )
        with self.env.begin(write=True) as txn:
            if keys is None:
                n = self._counters.get(txn, "entries")
                txn.drop(self._entries, delete=False)
                txn.drop(self._evict, delete=False)
                self._counters.set(txn, "entries", 0)
                self._counters.set(txn, "bytes", 0)
                return n
            return sum(self._remove(txn, k) for k in keys)

    # -- stats -----------------------------------------------------------------------
    def stats(self) -> StoreStats:
        self.flush_hits()
        with self.env.begin() as txn:
            counters = self._counters.read(txn, COUNTERS)
        data_file = self.path / "data.mdb"
        return StoreStats(
            path=str(self.path),
            size_cap=self.size_cap,
            file_bytes=data_file.stat().st_size if data_file.exists() else 0,
            **counters,
        )

    # -- internals (inside a write transaction) ---------------------------------------
    def _remove(self, txn: lmdb.Transaction, k: bytes) -> bool:
        raw = txn.get(k, db=self._entries)
        if raw is None:
            return False
        try:
            txn.delete(_evict_key(decode_entry(raw), k), db=self._evict)
        except CorruptValue:
            self._delete_evict_refs(txn, k)
        txn.delete(k, db=self._entries)
        self._counters.add(txn, "entries", -1)
        self._counters.add(txn, "bytes", -len(raw))
        return True

    def _delete_evict_refs(self, txn: lmdb.Transaction, k: bytes) -> None:
        # A corrupt entry's priority is unknown: find its index key by scanning.
        stale = [ek for ek, _ in txn.cursor(db=self._evict) if ek[8:] == k]
        for ek in stale:
            txn.delete(ek, db=self._evict)

    def _make_room(self, txn: lmdb.Transaction, need: int) -> None:
        self._evict_down_to(txn, self._byte_budget - need)

    def _evict_down_to(self, txn: lmdb.Transaction, target: int) -> None:
        """Evict lowest-priority entries until the counted bytes are at most ``target``."""
        cursor = txn.cursor(db=self._evict)
        while self._counters.get(txn, "bytes") > max(target, 0) and cursor.first():
            k = bytes(cursor.key()[8:])
            cursor.delete()
            if self._remove(txn, k):
                self._counters.add(txn, "evictions", 1)

    def _drop_corrupt(self, k: bytes, reason: str) -> None:
        log.error("corrupt cache value for %s dropped (%s)", k.hex(), reason)
        try:
            with self.env.begin(write=True) as txn:
                if self._remove(txn, k):
                    self._counters.add(txn, "corrupt_dropped", 1)
        except lmdb.Error as exc:
            log.warning("could not drop corrupt value %s: %s", k.hex(), exc)
