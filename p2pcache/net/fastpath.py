"""Bulk-transfer fast path for py-libp2p 0.8.1's Noise + yamux (64 MB fetch on loopback:
~200 MB/s stock -> ~450 MB/s; figures and profile in docs/benchmarks.md, "Network").

Where the time went (cProfile of both processes, `bench/bench_net_fetch.py --profile`):

1. **Flow control stalls.** A yamux stream starts with a 256 KB window. When the sender's
   window is empty, py-libp2p's ``YamuxStream.write`` *polls* every 10 ms for a window update.
   Fix (protocol-compliant, what go-yamux does with its initial window option): the fetch client
   grants the response stream a 16 MB receive window as soon as it opens it
   (`grant_receive_window`), so the sender never waits on a 10 ms poll.
2. **Per-frame overhead.** yamux data frames are capped at 64 KB (go-yamux's default); each
   frame costs locks, a copy of header + chunk, a Noise message and a socket send, and every
   ``logger.debug(f"...")`` formats its f-string even when debug logging is off. We raise the
   frame cap to `FRAME_SIZE` (always <= the peer's granted window, so still within the spec),
   send all Noise messages of one frame with a single socket write, and size fetch body
   frames (`BODY_FRAME`) so that one body frame is exactly one yamux frame.
3. **Tiny socket reads.** The Noise reader asks the socket for exactly 2 bytes (the length)
   and then exactly the message: two ``recv`` calls and trio checkpoints per 64 KB. The
   patched transport reader reads ahead up to `READ_AHEAD` bytes and parses messages out of
   its buffer; the secure session joins whole messages instead of extending a buffer.
4. **Quadratic copies in the stream buffer** (fixed in `p2pcache.net.fetch`, not here): a
   partial read of a yamux stream leaves its bytearray with a front offset, and CPython then
   copies the whole buffered window on the next append; the fetch client reads everything
   buffered at once (`fetch.BODY_READ_SIZE`).
ChaCha20-Poly1305 itself (``cryptography``) is not the bottleneck: ~25 ms per 64 MB each way.

Security: every byte still goes through the connection's Noise cipher states (ChaCha20-
Poly1305, one nonce per message, messages <= 65,535 bytes as the spec says); the patches only
change buffering and batching. A cipher state without a key (which noise would turn into a
plaintext pass-through) is refused, and a message failing authentication raises as before
(tests/test_net_fastpath.py: no plaintext on the wire, a flipped bit kills the connection).

`install()` patches py-libp2p classes in this process (idempotent). Wire format is unchanged:
patched and stock peers interoperate (frames never exceed the window the receiver granted).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.security.noise import io as noise_io
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux as yamux_mod
from noise.exceptions import NoiseInvalidMessage

log = logging.getLogger(__name__)

FRAME_SIZE = 1024 * 1024  # yamux data frame cap with the fast path
# A fetch body frame (u32 length + payload) that fills exactly one such yamux frame: a 1 MB
# payload would spill 16 bytes into a second yamux frame, Noise message and socket write.
BODY_FRAME = FRAME_SIZE - yamux_mod.HEADER_SIZE - 4
READ_AHEAD = 1024 * 1024
GRANT_WINDOW = yamux_mod.MAX_WINDOW_SIZE  # 16 MB
_MAX_PT = noise_io.MAX_PLAINTEXT_LENGTH
_LEN2 = struct.Struct(">H")
_installed = False


def _keyed(cipher: Any) -> Any:
    # noise's CipherState passes data through unencrypted when it has no key. After the
    # handshake it always has one; refuse rather than ever send or accept plaintext.
    if not cipher.has_key():
        raise NoiseInvalidMessage("Noise transport cipher has no key")
    return cipher


async def _write_msg(
    self: noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False
) -> None:
    if prefix_encoded or len(msg) <= _MAX_PT:
        await _orig_write_msg(self, msg, prefix_encoded)
        return
    # The cipher state directly: NoiseConnection.encrypt insists on bytes (a copy per slice).
    cipher = _keyed(self.noise_state.noise_protocol.cipher_state_encrypt)
    view = memoryview(msg)
    parts = []
    for off in range(0, len(msg), _MAX_PT):
        ct = cipher.encrypt_with_ad(None, view[off : off + _MAX_PT])
        parts.append(_LEN2.pack(len(ct)))
        parts.append(ct)
    await self.read_writer.read_write_closer.write(b"".join(parts))


async def _read_msg(self: noise_io.NoiseTransportReadWriter, prefix_encoded: bool = False) -> bytes:
    if prefix_encoded:
        return await _orig_read_msg(self, prefix_encoded)
    buf: bytearray | None = getattr(self, "_otd_rbuf", None)
    if buf is None:
        buf = self._otd_rbuf = bytearray()
    raw = self.read_writer.read_write_closer
    need = 2
    while True:
        if len(buf) >= 2:
            need = 2 + _LEN2.unpack_from(buf, 0)[0]
            if len(buf) >= need:
                break
        chunk = await raw.read(max(READ_AHEAD, need - len(buf)))
        if not chunk:
            raise IncompleteReadError(
                f"connection closed: expected {need} bytes, buffered {len(buf)}",
                expected_bytes=need,
                received_bytes=len(buf),
            )
        buf += chunk
    with memoryview(buf) as view:
        try:
            pt = _keyed(self.noise_state.noise_protocol.cipher_state_decrypt).decrypt_with_ad(
                None, view[2:need]
            )
        except InvalidTag as exc:
            raise NoiseInvalidMessage("Failed authentication of message") from exc
    del buf[:need]
    return pt


async def _read_exactly(reader: object, n: int, retry_count: int = 100) -> bytes:
    """`libp2p.io.utils.read_exactly` without its two extra copies in the common case."""
    first = await reader.read(n)  # type: ignore[attr-defined]
    if len(first) == n:
        return first
    parts, have = [first], len(first)
    for _ in range(retry_count):
        if have >= n:
            return b"".join(parts)
        more = await reader.read(n - have)  # type: ignore[attr-defined]
        parts.append(more)
        have += len(more)
    if have >= n:
        return b"".join(parts)
    raise IncompleteReadError(
        f"connection closed: expected {n} bytes, got {have}", expected_bytes=n, received_bytes=have
    )


async def _session_read(self: SecureSession, n: int | None = None) -> bytes:
    """`SecureSession.read` gathering whole Noise messages into one join (was: extend + copy).

    Also when a previous read left part of a message buffered: a yamux frame rarely ends on a
    Noise message boundary, so that is the common case for bulk bodies.
    """
    if n is None or n <= 0:
        return await _orig_session_read(self, n)
    parts: list[bytes] = []
    have = 0
    if self.low_watermark != self.high_watermark:
        first = self._drain(n)
        if len(first) == n:
            return first
        parts.append(first)
        have = len(first)
    while have < n:
        msg = await self.conn.read_msg()
        if msg == b"":
            if parts:
                break
            raise ConnectionClosedError("Connection closed")
        need = n - have
        if len(msg) <= need:
            parts.append(msg)
            have += len(msg)
        else:
            parts.append(msg[:need])
            self._fill(msg[need:])
            have = n
    return parts[0] if len(parts) == 1 else b"".join(parts)


_orig_session_read = SecureSession.read
_orig_write_msg = noise_io.NoiseTransportReadWriter.write_msg
_orig_read_msg = noise_io.NoiseTransportReadWriter.read_msg


def install() -> None:
    """Patch py-libp2p in this process for fast bulk transfers (idempotent)."""
    global _installed
    if _installed:
        return
    yamux_mod.MAX_MESSAGE_SIZE = FRAME_SIZE
    noise_io.NoiseTransportReadWriter.write_msg = _write_msg  # type: ignore[method-assign]
    noise_io.NoiseTransportReadWriter.read_msg = _read_msg  # type: ignore[method-assign]
    yamux_mod.read_exactly = _read_exactly  # the yamux module's own reference
    SecureSession.read = _session_read  # type: ignore[method-assign]
    _installed = True


async def grant_receive_window(stream: object, window: int = GRANT_WINDOW) -> None:
    """Raise a yamux stream's receive window to ``window`` now (one WINDOW_UPDATE frame).

    Call right after opening a stream that will receive a large body. No-op on other muxers.
    """
    ys = getattr(stream, "muxed_stream", stream)
    if not isinstance(ys, yamux_mod.YamuxStream):
        return
    async with ys.window_lock:
        delta = window - ys.recv_window
        if delta <= 0:
            return
        ys.recv_window += delta
        ys.target_recv_window = max(ys.target_recv_window, window)
    await ys.send_window_update(delta, skip_lock=True)
