"""Framing on a libp2p stream: ``u32 length | payload`` frames with hard size limits.

Every read is bounded by a caller's deadline (``trio.fail_after`` around the whole exchange)
and by a maximum frame size, so a slow or hostile peer costs at most one timeout and one
bounded buffer, never unbounded memory.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

import msgpack

from p2pcache.errors import StreamEnded, WireError  # noqa: F401 - re-exported

LEN = struct.Struct(">I")
MAX_CONTROL_FRAME = 64 * 1024  # requests and response headers
MAX_DATA_FRAME = 4 * 1024 * 1024  # one body frame


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class FrameReader:
    """Buffered exact reads on a stream (py-libp2p's ``read(n)`` returns up to n bytes).

    Body frames can be read straight into a preallocated buffer (`read_frame_into`), so a
    large value is copied once from the muxer into its final place.
    """

    def __init__(self, stream: ByteStream, read_size: int = 1 << 20) -> None:
        self.stream = stream
        self.read_size = read_size
        self._buf = b""
        self._pos = 0

    def _buffered(self) -> int:
        return len(self._buf) - self._pos

    async def _more(self, want: int, have: int) -> bytes:
        try:
            chunk = await self.stream.read(max(self.read_size, want))
        except Exception as exc:  # py-libp2p raises several EOF/reset types
            raise StreamEnded(f"stream ended after {have} of {have + want} bytes: {exc!r}") from exc
        if not chunk:
            raise StreamEnded(f"stream ended after {have} of {have + want} bytes")
        return chunk

    async def read_exact(self, n: int) -> bytes:
        if self._buffered() >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n:
            chunk = await self._more(n - have, have)
            take = min(len(chunk), n - have)
            parts.append(chunk[:take] if take < len(chunk) else chunk)
            have += take
            if take < len(chunk):
                self._buf, self._pos = chunk, take
        return b"".join(parts)

    async def read_into(self, dst: memoryview) -> None:
        """Fill ``dst`` exactly."""
        n, done = len(dst), 0
        if self._buffered():
            take = min(self._buffered(), n)
            dst[:take] = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            done = take
        while done < n:
            chunk = await self._more(n - done, done)
            take = min(len(chunk), n - done)
            dst[done : done + take] = memoryview(chunk)[:take]
            done += take
            if take < len(chunk):
                self._buf, self._pos = chunk, take

    async def read_len(self, limit: int) -> int:
        (n,) = LEN.unpack(await self.read_exact(LEN.size))
        if n > limit:
            raise WireError(f"frame of {n} bytes exceeds the limit of {limit}")
        return n

    async def read_frame(self, limit: int) -> bytes:
        n = await self.read_len(limit)
        return await self.read_exact(n) if n else b""

    async def read_msg(self, limit: int = MAX_CONTROL_FRAME) -> dict[str, Any]:
        raw = await self.read_frame(limit)
        try:
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as exc:
            raise WireError(f"malformed message: {exc}") from exc
        if not isinstance(msg, dict):
            raise WireError("message is not a map")
        return msg


def frame(payload: bytes) -> bytes:
    return LEN.pack(len(payload)) + payload


def pack_msg(msg: dict[str, Any]) -> bytes:
    return frame(msgpack.packb(msg, use_bin_type=True))
