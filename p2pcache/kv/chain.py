"""kv_config and the chunk hash chain.

``h_0 = sha256("p2pcache/kv/1" || model_hash || kv_config)`` and
``h_i = sha256(h_{i-1} || kv_config || tokens of chunk i)`` (tokens as int32 LE), as in
vLLM's prefix-cache block hashes. A chunk's hash names the whole prefix up to its end, so two
requests sharing a prefix share its chunks, and a chunk of another model or KV format can
never be found: the config is in every link.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

STATE_FORMAT_VERSION = 2  # bump when the chunk payload layout changes (2: V kept transposed)


@dataclass(frozen=True)
class KvConfig:
    """Everything that decides whether stored K/V rows are valid for this context."""

    model_hash: str
    chunk_tokens: int
    type_k: str  # "f16" | "q8_0" | "q4_0"
    type_v: str
    flash_attn: bool
    n_batch: int  # prefill batch size: part of the numerics of the stored rows
    n_swa: int  # sliding window (0: none); decides which rows a restore needs
    layout: tuple[object, ...]  # StateLayout.describe(): llama.cpp's state layout

    def encode(self) -> bytes:
        doc = {
            "v": STATE_FORMAT_VERSION,
            "model_hash": self.model_hash,
            "chunk_tokens": self.chunk_tokens,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
            "n_batch": self.n_batch,
            "n_swa": self.n_swa,
            "layout": list(self.layout),
        }
        return msgpack.packb(doc, use_bin_type=True)

    def digest(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()


def chain_root(config: KvConfig) -> bytes:
    return hashlib.sha256(
        b"p2pcache/kv/1" + bytes.fromhex(config.model_hash) + config.encode()
    ).digest()


def chunk_hashes(
    config: KvConfig, tokens: Sequence[int], n_chunks: int | None = None
) -> list[bytes]:
    """Hashes of the full chunks of ``tokens`` (at most ``n_chunks``)."""
    c = config.chunk_tokens
    n = len(tokens) // c if n_chunks is None else min(n_chunks, len(tokens) // c)
    arr = np.asarray(tokens[: n * c], dtype="<i4")
    cfg = config.digest()
    out: list[bytes] = []
    h = chain_root(config)
    for i in range(n):
        h = hashlib.sha256(h + cfg + arr[i * c : (i + 1) * c].tobytes()).digest()
        out.append(h)
    return out
