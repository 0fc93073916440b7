"""Local persistence: LMDB entries with checksums, counters and eviction by use."""

from p2pcache.store.lmdb_store import (
    DEFAULT_SIZE_CAP,
    EntryTooLarge,
    Store,
    StoreError,
    StoreStats,
)
from p2pcache.store.records import CacheLevel, CorruptValue, Entry, Output

__all__ = [
    "DEFAULT_SIZE_CAP",
    "CacheLevel",
    "CorruptValue",
    "Entry",
    "EntryTooLarge",
    "Output",
    "Store",
    "StoreError",
    "StoreStats",
]
