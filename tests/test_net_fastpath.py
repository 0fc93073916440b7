"""The bulk fast path (`p2pcache.net.fastpath`) keeps Noise: encrypted, authenticated,
interoperable.

Server and client are separate processes (tests/fastpath_peer.py); a TCP relay in this process
sits between them, records what crosses the wire and can flip one bit of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fastpath_peer import MARKER, blob

PEER = Path(__file__).with_name("fastpath_peer.py")
ROOT = PEER.parent.parent
MB = 8
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Relay:
    """Forwards one TCP connection to ``port``; records server->client bytes; optionally flips
    one bit of the server->client stream at byte offset ``flip_at``."""

    def __init__(self, port: int, flip_at: int | None = None) -> None:
        self.target = port
        self.flip_at = flip_at
        self.down = bytearray()  # server -> client, as seen on the wire
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(60)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while chunk := src.recv(1 << 20):
                if record:
                    start = len(self.down)
                    if self.flip_at is not None and start <= self.flip_at < start + len(chunk):
                        b = bytearray(chunk)
                        b[self.flip_at - start] ^= 0x01
                        chunk = bytes(b)
                    self.down += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self) -> None:
        try:
            client, _ = self.lsock.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        for s in (client, server):
            s.settimeout(60)
        up = threading.Thread(target=self._pipe, args=(client, server, False), daemon=True)
        up.start()
        self._pipe(server, client, True)
        up.join(timeout=10)

    def close(self) -> None:
        self.lsock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve():  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen[str]] = []

    def start(fast: bool) -> tuple[int, str]:
        p = subprocess.Popen(
            [sys.executable, str(PEER), "serve", "--fast", str(int(fast)), "--mb", str(MB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()  # blocks until READY or exit
        assert line.startswith("READY"), f"server did not start: {line!r}"
        addr = line.split()[1]
        return int(addr.split("/tcp/")[1].split("/")[0]), addr.split("/p2p/")[1]

    yield start
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def fetch_via(port: int, peer_id: str, fast: bool) -> dict[str, object]:
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"
    out = subprocess.run(
        [
            sys.executable,
            str(PEER),
            "fetch",
            "--fast",
            str(int(fast)),
            "--addr",
            addr,
            "--mb",
            str(MB),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fast_path_body_is_encrypted_on_the_wire_and_arrives_intact(serve) -> None:  # type: ignore[no-untyped-def]
    port, pid = serve(True)
    relay = Relay(port)
    got = fetch_via(relay.port, pid, True)
    relay.close()
    assert got["ok"], got
    assert got["sha256"] == hashlib.sha256(blob(MB)).hexdigest()
    assert len(relay.down) > MB << 20  # the whole body crossed the relay ...
    assert MARKER not in relay.down  # ... and none of it in the clear
    assert MARKER[:8] not in relay.down


@pytest.mark.parametrize("server_fast,client_fast", [(True, False), (False, True)])
def test_fast_path_interoperates_with_stock_py_libp2p(  # type: ignore[no-untyped-def]
    serve, server_fast: bool, client_fast: bool
) -> None:
    port, pid = serve(server_fast)
    got = fetch_via(port, pid, client_fast)
    assert got["ok"], got
    assert got["sha256"] == hashlib.sha256(blob(MB)).hexdigest()


def test_fast_path_rejects_a_flipped_ciphertext_bit(serve) -> None:  # type: ignore[no-untyped-def]
    port, pid = serve(True)
    relay = Relay(port, flip_at=(MB << 20) // 2)  # well inside the body, long after the handshake
    got = fetch_via(relay.port, pid, True)
    relay.close()
    assert not got["ok"], "a tampered transfer must fail, never return altered data"
    # Caught by the Noise MAC (the connection drops), not only later by the body's signed sha256.
    assert "sha256" not in str(got["error"]), got
