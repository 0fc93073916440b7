"""Fetch protocol ``/otd/fetch/1.0.0``: one request per stream, a signed streamed response.

Request (one frame, msgpack map)::

    {v: 1, key: <64 hex>, model_hash: <64 hex>, level: "decoder_final" | "kv_prefix",
     range: [first_chunk, end_chunk] | None, max_bytes: int,
     chunks: [32-byte chain hash, ...]}   # kv_prefix only: the hashes of chunks first..end-1

A ``kv_prefix`` request names the tip of a hash chain (``key``), the chunk range it lacks and
those chunks' hashes (the requester computes them from its own prompt; the tip commits to the
whole chain). See `p2pcache.net.kv_tier` for its body.

Response: a header frame ``{v, status, ...}``; when ``status == "ok"`` it carries
``key, model_hash, level, range, size, sha256, requester, server, ts, sig`` and is followed by
body frames (each <= `MAX_DATA_FRAME`) and an empty end frame. ``sig`` is the server's
Ed25519 signature over `response_payload(...)`: the serving peer signs exactly what it sends,
to this requester, so a lying answer is its own evidence (see `p2pcache.net.evidence`).

Server limits: a deadline per request, a cap on concurrent streams per peer (excess requests
get ``busy``), entries marked private are never served (they look like ``not_found``).
Client limits: a deadline per request, ``max_bytes`` checked against the header and against
every frame as it arrives, the body's sha256 and the header signature checked before use.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pcache.errors import BadResponse, Busy, FetchError, FetchTimeout, NotFound  # noqa: F401 - re-exported
from p2pcache.identity import Identity
from p2pcache.net.config import ServerLimits
from p2pcache.net.fastpath import BODY_FRAME, grant_receive_window
from p2pcache.net.peer_keys import canonical, verify_by_peer
from p2pcache.net.wire import (
    LEN,
    MAX_CONTROL_FRAME,
    MAX_DATA_FRAME,
    FrameReader,
    StreamEnded,
    WireError,
    pack_msg,
)
from p2pcache.store import Entry, Output, Store, now_ms

log = logging.getLogger(__name__)

FETCH_PROTOCOL = TProtocol("/otd/fetch/1.0.0")
PROTOCOL_VERSION = 1
LEVELS = ("decoder_final", "kv_prefix")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
MAX_KV_CHUNKS = 1024  # chunk hashes per kv_prefix request (34 KB of the 64 KB control frame)
# Body reads ask yamux for everything buffered (up to the 16 MB window we grant): a read that
# drains the stream buffer is one copy, while partial reads leave it with a front offset that
# makes CPython copy the whole buffer on the next append (quadratic in the buffered bytes).
BODY_READ_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class FetchRequest:
    key: str
    model_hash: str
    level: str = "decoder_final"
    range: tuple[int, int] | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    chunks: tuple[bytes, ...] = ()  # kv_prefix: hashes of the chunks in `range`

    def to_msg(self) -> dict[str, Any]:
        m = {
            "v": PROTOCOL_VERSION,
            "key": self.key,
            "model_hash": self.model_hash,
            "level": self.level,
            "range": list(self.range) if self.range else None,
            "max_bytes": self.max_bytes,
        }
        if self.chunks:
            m["chunks"] = list(self.chunks)
        return m

    @classmethod
    def from_msg(cls, m: dict[str, Any]) -> FetchRequest:
        if m.get("v") != PROTOCOL_VERSION:
            raise WireError("unsupported protocol version")
        key, mh, level = m.get("key"), m.get("model_hash"), m.get("level")
        if not (isinstance(key, str) and _HEX64.match(key)):
            raise WireError("key is not 64 hex characters")
        if not (isinstance(mh, str) and _HEX64.match(mh)):
            raise WireError("model_hash is not 64 hex characters")
        if level not in LEVELS:
            raise WireError(f"unknown level {level!r}")
        rng = m.get("range")
        if rng is not None:
            if not (
                isinstance(rng, list)
                and len(rng) == 2
                and all(type(x) is int and x >= 0 for x in rng)
                and rng[0] < rng[1]
            ):
                raise WireError("range must be [first, end) with 0 <= first < end")
            rng = (rng[0], rng[1])
        mb = m.get("max_bytes", DEFAULT_MAX_BYTES)
        if type(mb) is not int or mb <= 0:
            raise WireError("max_bytes must be a positive integer")
        chunks = m.get("chunks") or []
        if not (
            isinstance(chunks, list)
            and len(chunks) <= MAX_KV_CHUNKS
            and all(isinstance(h, bytes) and len(h) == 32 for h in chunks)
        ):
            raise WireError(f"chunks must be a list of at most {MAX_KV_CHUNKS} 32-byte hashes")
        return cls(key, mh, level, rng, mb, tuple(chunks))


@dataclass(frozen=True)
class ResponseHeader:
    key: str
    model_hash: str
    level: str
    range: tuple[int, int] | None
    size: int
    sha256: str
    requester: str
    server: str
    ts: int
    sig: bytes = b""

    def payload(self) -> bytes:
        return canonical(
            b"otd-fetch-v1",
            self.key,
            self.model_hash,
            self.level,
            list(self.range) if self.range else None,
            self.size,
            self.sha256,
            self.requester,
            self.server,
            self.ts,
        )

    def to_msg(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "status": "ok",
            "key": self.key,
            "model_hash": self.model_hash,
            "level": self.level,
            "range": list(self.range) if self.range else None,
            "size": self.size,
            "sha256": self.sha256,
            "requester": self.requester,
            "server": self.server,
            "ts": self.ts,
            "sig": self.sig,
        }

    @classmethod
    def from_msg(cls, m: dict[str, Any]) -> ResponseHeader:
        try:
            rng = m["range"]
            h = cls(
                str(m["key"]),
                str(m["model_hash"]),
                str(m["level"]),
                (int(rng[0]), int(rng[1])) if rng else None,
                int(m["size"]),
                str(m["sha256"]),
                str(m["requester"]),
                str(m["server"]),
                int(m["ts"]),
                bytes(m["sig"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BadResponse(f"malformed response header: {exc!r}") from exc
        return h

    def signature_ok(self) -> bool:
        return verify_by_peer(self.server, self.sig, self.payload())


@dataclass(frozen=True)
class Fetched:
    header: ResponseHeader
    body: bytes | bytearray
    seconds: float  # request sent -> last byte checked
    ttfb: float = 0.0  # request sent -> response header read (latency, for provider ranking)

    @property
    def throughput(self) -> float:
        return len(self.body) / self.seconds if self.seconds > 0 else 0.0


# -- what a server can serve ------------------------------------------------------------


class ValueSource(Protocol):
    def value(self, req: FetchRequest) -> bytes | None:
        """The bytes to serve for this request, or None (absent, private, foreign model)."""


def entry_to_wire(entry: Entry) -> bytes:
    """The network form of a `decoder_final` entry: what the producer signed, nothing local."""
    return msgpack.packb(
        {
            "input_sha256": entry.input_sha256,
            "model_hash": entry.model_hash,
            "cache_level": entry.cache_level,
            "output": {
                "tokens": entry.output.tokens,
                "text": entry.output.text,
                "finish_reason": entry.output.finish_reason,
            },
            "params": entry.params,
            "producer": entry.producer,
            "signature": entry.signature,
            "prompt_tokens": entry.prompt_tokens,
        },
        use_bin_type=True,
    )


def entry_from_wire(body: bytes) -> Entry:
    """Parse a fetched entry; raises BadResponse on anything malformed."""
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=True)
        out = d["output"]
        tokens = out["tokens"]
        if not (
            isinstance(tokens, list) and all(type(t) is int and 0 <= t < 2**31 for t in tokens)
        ):
            raise ValueError("tokens must be a list of ints")
        if not isinstance(out["text"], str) or out["finish_reason"] not in ("stop", "length"):
            raise ValueError("bad text or finish_reason")
        if not isinstance(d["params"], dict) or not isinstance(d["signature"], bytes):
            raise ValueError("bad params or signature")
        entry = Entry(
            input_sha256=str(d["input_sha256"]),
            model_hash=str(d["model_hash"]),
            cache_level=d["cache_level"],
            output=Output(tokens, out["text"], out["finish_reason"]),
            params=d["params"],
            privacy_flag=False,
            producer=str(d["producer"]),
            signature=d["signature"],
            verified_by_us=False,
            prompt_tokens=int(d.get("prompt_tokens", 0)),
        )
    except BadResponse:
        raise
    except Exception as exc:
        raise BadResponse(f"malformed entry: {exc!r}") from exc
    if entry.cache_level != "decoder_final":
        raise BadResponse("entry is not a decoder_final")
    return entry


class StoreSource:
    """Serves shared `decoder_final` entries of one model from the local store."""

    def __init__(self, store: Store, model_hash: str) -> None:
        self.store = store
        self.model_hash = model_hash

    def value(self, req: FetchRequest) -> bytes | None:
        if req.level != "decoder_final" or req.model_hash != self.model_hash:
            return None
        entry = self.store.get(req.key)
        if entry is None or entry.privacy_flag or entry.model_hash != self.model_hash:
            return None  # private entries are indistinguishable from absent ones
        return entry_to_wire(entry)


class BlobSource:
    """Values kept in memory (benchmarks, kv chunks handed over by the caller)."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str], bytes] = {}

    def put(self, key: str, level: str, value: bytes) -> None:
        self.blobs[(key, level)] = value

    def value(self, req: FetchRequest) -> bytes | None:
        return self.blobs.get((req.key, req.level))


class ChainSource:
    def __init__(self, *sources: ValueSource) -> None:
        self.sources = list(sources)

    def value(self, req: FetchRequest) -> bytes | None:
        for s in self.sources:
            if (v := s.value(req)) is not None:
                return v
        return None


# -- server -----------------------------------------------------------------------------


@dataclass
class ServerStats:
    served: int = 0
    not_found: int = 0
    busy: int = 0
    bad_requests: int = 0
    bytes_out: int = 0


class FetchServer:
    """The ``/otd/fetch/1.0.0`` handler. Register with ``host.set_stream_handler``."""

    def __init__(
        self,
        identity: Identity,
        source: ValueSource,
        limits: ServerLimits | None = None,
        is_banned: Callable[[str], bool] = lambda _p: False,
        on_served: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.identity = identity
        self.source = source
        self.on_served = on_served  # bytes of each body served (the node's metrics)
        self.limits = limits or ServerLimits()
        self.is_banned = is_banned
        self.stats = ServerStats()
        self._active: dict[str, int] = {}
        self._digests: OrderedDict[tuple[str, str, int], str] = OrderedDict()

    def install(self, host: IHost) -> None:
        host.set_stream_handler(FETCH_PROTOCOL, self.handle)

    def _digest(self, req: FetchRequest, body: bytes) -> str:
        # Large values are served repeatedly: remember their digest (bounded LRU).
        k = (req.key, req.level, len(body))
        # kv_prefix bodies are not remembered: the same chunk hashes may be stored again with
        # other bytes (recomputed here after a peer's copy was evicted).
        if len(body) < 1 << 20 or req.level == "kv_prefix":
            return hashlib.sha256(body).hexdigest()
        d = self._digests.get(k)
        if d is None:
            d = self._digests[k] = hashlib.sha256(body).hexdigest()
            while len(self._digests) > 64:
                self._digests.popitem(last=False)
        return d

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if self.is_banned(peer):
            await _reset(stream)
            return
        if self._active.get(peer, 0) >= self.limits.max_streams_per_peer:
            self.stats.busy += 1
            await _reply_status(stream, "busy", "too many concurrent fetches")
            return
        self._active[peer] = self._active.get(peer, 0) + 1
        try:
            with trio.move_on_after(self.limits.request_timeout_s) as scope:
                await self._serve(stream, peer)
            if scope.cancelled_caught:
                log.info(
                    "fetch from %s timed out after %.0f s", peer[:16], self.limits.request_timeout_s
                )
                await _reset(stream)
        except Exception as exc:  # a broken peer must never take the server down
            log.info("fetch from %s failed: %r", peer[:16], exc)
            await _reset(stream)
        finally:
            self._active[peer] -= 1
            if not self._active[peer]:
                del self._active[peer]

    async def _serve(self, stream: INetStream, peer: str) -> None:
        reader = FrameReader(stream, read_size=MAX_CONTROL_FRAME)
        try:
            req = FetchRequest.from_msg(await reader.read_msg(MAX_CONTROL_FRAME))
        except WireError as exc:
            self.stats.bad_requests += 1
            await _reply_status(stream, "bad_request", str(exc))
            return
        body = self.source.value(req)
        if body is None:
            self.stats.not_found += 1
            await _reply_status(stream, "not_found", "")
            return
        if len(body) > req.max_bytes:
            await _reply_status(stream, "too_large", f"{len(body)} bytes")
            return
        header = ResponseHeader(
            req.key,
            req.model_hash,
            req.level,
            req.range,
            len(body),
            self._digest(req, body),
            peer,
            self.identity.peer_id,
            now_ms(),
        )
        header = ResponseHeader(**{**header.__dict__, "sig": self.identity.sign(header.payload())})
        await stream.write(pack_msg(header.to_msg()))
        await write_body(stream, body, self.limits.frame_size or BODY_FRAME)
        await stream.close()
        self.stats.served += 1
        self.stats.bytes_out += len(body)
        self.on_served(len(body))


async def write_body(stream: INetStream, body: bytes, frame_size: int) -> None:
    view = memoryview(body)
    for off in range(0, len(body), frame_size):
        chunk = view[off : off + frame_size]
        await stream.write(LEN.pack(len(chunk)) + chunk)
    await stream.write(LEN.pack(0))


async def _reply_status(stream: INetStream, status: str, reason: str) -> None:
    try:
        with trio.move_on_after(5):
            await stream.write(
                pack_msg({"v": PROTOCOL_VERSION, "status": status, "reason": reason})
            )
            await stream.close()
    except Exception:
        await _reset(stream)


async def _reset(stream: INetStream) -> None:
    try:
        with trio.move_on_after(2):
            await stream.reset()
    except Exception:
        pass


# -- client -----------------------------------------------------------------------------


async def fetch(
    host: IHost, peer_id: str, req: FetchRequest, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Fetched:
    """Fetch one value from one peer; raises a `FetchError` subclass on any failure."""
    t0 = time.perf_counter()
    stream: INetStream | None = None
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(ID.from_base58(peer_id), [FETCH_PROTOCOL])
            if req.max_bytes > 256 * 1024:
                await grant_receive_window(stream)
            await stream.write(pack_msg(req.to_msg()))
            reader = FrameReader(stream, read_size=BODY_READ_SIZE)
            head = await reader.read_msg(MAX_CONTROL_FRAME)
            ttfb = time.perf_counter() - t0
            status = head.get("status")
            if status == "not_found":
                raise NotFound(f"{peer_id[:16]} has no {req.key[:12]}")
            if status == "busy":
                raise Busy(f"{peer_id[:16]} is busy")
            if status != "ok":
                raise BadResponse(f"{peer_id[:16]} answered {status!r}: {head.get('reason', '')}")
            header = ResponseHeader.from_msg(head)
            if (header.key, header.model_hash, header.level) != (
                req.key,
                req.model_hash,
                req.level,
            ) or header.range != req.range:
                raise BadResponse("response header does not match the request")
            if header.server != peer_id or header.requester != host.get_id().to_base58():
                raise BadResponse("response header names the wrong peers")
            if header.size > req.max_bytes:
                raise BadResponse(
                    f"response of {header.size} bytes exceeds max_bytes {req.max_bytes}"
                )
            if not header.signature_ok():
                raise BadResponse("bad response signature")
            body, digest = await read_body(reader, header.size)
            if digest != header.sha256:
                raise BadResponse("body does not match the signed sha256")
        await _close(stream)
        return Fetched(header, body, time.perf_counter() - t0, ttfb)
    except trio.TooSlowError as exc:
        if stream is not None:
            await _reset(stream)
        raise FetchTimeout(
            f"fetch of {req.key[:12]} from {peer_id[:16]} timed out after {timeout_s} s"
        ) from exc
    except FetchError:
        if stream is not None:
            await _reset(stream)
        raise
    except StreamEnded as exc:  # the peer vanished or reset mid-transfer: unreliable, not lying
        if stream is not None:
            await _reset(stream)
        raise FetchError(str(exc)) from exc
    except WireError as exc:
        if stream is not None:
            await _reset(stream)
        raise BadResponse(str(exc)) from exc
    except Exception as exc:  # connection refused/reset, stream errors
        if stream is not None:
            await _reset(stream)
        raise FetchError(f"fetch from {peer_id[:16]} failed: {exc!r}") from exc


async def read_body(reader: FrameReader, size: int) -> tuple[bytearray, str]:
    """Read body frames into one preallocated buffer, hashing as they arrive."""
    body = bytearray(size)
    view = memoryview(body)
    digest = hashlib.sha256()
    done = 0
    while True:
        n = await reader.read_len(MAX_DATA_FRAME)
        if n == 0:
            break
        if done + n > size:
            raise BadResponse(f"body longer than the announced {size} bytes")
        part = view[done : done + n]
        await reader.read_into(part)
        digest.update(part)
        done += n
    if done != size:
        raise BadResponse(f"body of {done} bytes, announced {size}")
    view.release()
    return body, digest.hexdigest()


async def _close(stream: INetStream) -> None:
    try:
        with trio.move_on_after(2):
            await stream.close()
    except Exception:
        pass
