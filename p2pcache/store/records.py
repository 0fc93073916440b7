"""Cache entry records and their framed, checksummed on-disk encoding."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import msgpack

from p2pcache.errors import CorruptValue  # noqa: F401 - re-exported
from p2pcache.store.lmdb_env import decode_frame, encode_frame, now_ms

CacheLevel = Literal["decoder_final", "kv_prefix"]


@dataclass
class Output:
    """What a `decoder_final` entry replays: the completion tokens and text."""

    tokens: list[int]
    text: str
    finish_reason: str = "stop"

    def sha256(self) -> str:
        payload = msgpack.packb([self.tokens, self.text, self.finish_reason], use_bin_type=True)
        return hashlib.sha256(payload).hexdigest()


@dataclass
class Entry:
    """One cache entry, with the schema of the design document."""

    input_sha256: str
    model_hash: str
    cache_level: CacheLevel
    output: Output
    params: dict[str, Any]
    privacy_flag: bool = True
    embedding: int | None = None  # FAISS id, set by the semantic tier
    inserted_at: int = field(default_factory=now_ms)
    hits: int = 0
    last_hit_at: int = 0
    size: int = 0  # bytes of the encoded value, filled in by the store
    producer: str = ""  # peer id of the node that computed the output
    signature: bytes = b""  # producer's Ed25519 signature over signing_payload()
    verified_by_us: bool = True  # computed or verified locally
    prompt_tokens: int = 0  # how many input tokens the key covered (for stats and gates)

    def signing_payload(self) -> bytes:
        """The bytes a producer signs: binds the output to the key and the model."""
        return msgpack.packb(
            [
                b"otd-entry-v1",
                self.input_sha256,
                self.model_hash,
                self.cache_level,
                self.output.sha256(),
            ],
            use_bin_type=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["output"] = Output(**d["output"])
        return cls(**d)


def encode_entry(entry: Entry) -> bytes:
    return encode_frame(msgpack.packb(entry.to_dict(), use_bin_type=True))


def decode_entry(value: bytes | memoryview) -> Entry:
    payload = decode_frame(value)
    try:
        return Entry.from_dict(msgpack.unpackb(payload, raw=False))
    except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
        raise CorruptValue(f"undecodable entry: {exc}") from exc
