"""Local persistence: one LMDB environment per data dir (`LmdbEnv`, shared by the KV chunks,
reputation and semantic tenants); entries with checksums, counters and eviction by use."""

from p2pcache.store.lmdb_env import Counters, LmdbEnv, Schema, now_ms
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
    "Counters",
    "Entry",
    "EntryTooLarge",
    "LmdbEnv",
    "Output",
    "Schema",
    "Store",
    "StoreError",
    "StoreStats",
    "now_ms",
]
