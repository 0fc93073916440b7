"""KV prefix states: hash-chained chunks in LMDB, restored into llama.cpp in milliseconds."""

from p2pcache.kv.chain import KvConfig, chunk_hashes
from p2pcache.kv.chunk_store import KvChunkStore, KvStats
from p2pcache.kv.engine import (
    KvPolicy,
    KvPrefixCache,
    PendingChunks,
    PrefixGeneration,
    kv_backend_options,
)
from p2pcache.kv.state_format import StateFormatError

__all__ = [
    "KvChunkStore",
    "KvConfig",
    "KvPolicy",
    "KvPrefixCache",
    "KvStats",
    "PendingChunks",
    "PrefixGeneration",
    "StateFormatError",
    "chunk_hashes",
    "kv_backend_options",
]
