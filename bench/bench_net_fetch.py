"""Fetch throughput of one value over libp2p (/otd/fetch/1.0.0, Noise + yamux) vs a plain
trio TCP socket, loopback, server and client in separate processes. Prints a table of medians.

    flock /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_net_fetch.py --mb 64 --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

KEY = "ab" * 32
MODEL = "cd" * 32


def _blob(mb: int) -> bytes:
    return os.urandom(mb * 1024 * 1024)


async def serve_libp2p(mb: int, fast: bool) -> None:
    from p2pcache.identity import Identity
    from p2pcache.net import fastpath
    from p2pcache.net.fetch import BlobSource, FetchServer
    from p2pcache.net.host import HostConfig, full_addrs, running_host

    if fast:
        fastpath.install()
    ident = Identity.load_or_create(Path(tempfile.mkdtemp()) / "identity.key")
    src = BlobSource()
    src.put(KEY, "kv_prefix", _blob(mb))
    async with running_host(ident, HostConfig()) as host:
        FetchServer(ident, src).install(host)
        print("READY", full_addrs(host)[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


async def client_libp2p(addr: str, mb: int, runs: int, fast: bool) -> list[float]:
    from p2pcache.identity import Identity
    from p2pcache.net import fastpath
    from p2pcache.net.fetch import FetchRequest, fetch
    from p2pcache.net.host import HostConfig, dial, running_host

    if fast:
        fastpath.install()
    ident = Identity.load_or_create(Path(tempfile.mkdtemp()) / "identity.key")
    out = []
    async with running_host(ident, HostConfig()) as host:
        info = await dial(host, addr)
        req = FetchRequest(KEY, MODEL, "kv_prefix", max_bytes=(mb + 1) << 20)
        await fetch(host, info.peer_id.to_base58(), req)  # warm-up (connection, window growth)
        for _ in range(runs):
            got = await fetch(host, info.peer_id.to_base58(), req, timeout_s=120)
            assert len(got.body) == mb << 20
            out.append(got.seconds)
    return out


async def serve_tcp(mb: int) -> None:
    blob = _blob(mb)
    digest = hashlib.sha256(blob).digest()

    async def handler(s: trio.SocketStream) -> None:
        while (await s.receive_some(1)) == b"g":
            await s.send_all(digest)
            view = memoryview(blob)
            for off in range(0, len(blob), 1 << 20):
                await s.send_all(view[off:off + (1 << 20)])

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print("READY", listeners[0].socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, handler, listeners)
        await trio.to_thread.run_sync(sys.stdin.read)
        n.cancel_scope.cancel()


async def client_tcp(port: int, mb: int, runs: int) -> list[float]:
    out = []
    size = mb << 20
    s = await trio.open_tcp_stream("127.0.0.1", port)
    for i in range(runs + 1):
        t0 = time.perf_counter()
        await s.send_all(b"g")
        digest = b""
        while len(digest) < 32:
            digest += await s.receive_some(32 - len(digest))
        buf = bytearray()
        while len(buf) < size:
            buf += await s.receive_some(min(size - len(buf), 1 << 20))
        assert hashlib.sha256(buf).digest() == digest  # same integrity work as the fetch client
        if i:
            out.append(time.perf_counter() - t0)
    await s.aclose()
    return out


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    line = p.stdout.readline()  # the readiness line
    if not line.startswith("READY"):
        p.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return p, line.split()[1]


def _stop(p: subprocess.Popen[str]) -> None:
    try:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
    except Exception:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--role", default="bench")
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--modes", default="tcp,libp2p-stock,libp2p-fast")
    a = ap.parse_args()
    if a.role == "serve-libp2p":
        trio.run(serve_libp2p, a.mb, bool(a.fast))
        return
    if a.role == "serve-tcp":
        trio.run(serve_tcp, a.mb)
        return
    rows = []
    for mode in a.modes.split(","):
        if mode == "tcp":
            p, port = _spawn(["--role", "serve-tcp", "--mb", str(a.mb)])
            try:
                secs = trio.run(client_tcp, int(port), a.mb, a.runs)
            finally:
                _stop(p)
        else:
            fast = mode == "libp2p-fast"
            p, addr = _spawn(["--role", "serve-libp2p", "--mb", str(a.mb), "--fast", str(int(fast))])
            try:
                secs = trio.run(client_libp2p, addr, a.mb, a.runs, fast)
            finally:
                _stop(p)
        med = statistics.median(secs)
        rows.append((mode, med, (a.mb << 20) / med / 1e6, min(secs), max(secs)))
    print(f"\n{a.mb} MB value, loopback, separate processes, {a.runs} runs (+1 warm-up), medians")
    print(f"{'transport':<16} {'median s':>9} {'MB/s':>9} {'min s':>8} {'max s':>8}")
    for mode, med, mbs, lo, hi in rows:
        print(f"{mode:<16} {med:9.3f} {mbs:9.1f} {lo:8.3f} {hi:8.3f}")


if __name__ == "__main__":
    main()
