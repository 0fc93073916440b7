"""Fetch throughput of one value over libp2p (/otd/fetch/1.0.0, Noise + yamux) vs a plain
trio TCP socket, loopback, server and client in separate processes. Prints a table of medians.

    flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_net_fetch.py --rounds 5 --runs 3

Modes: ``tcp-raw`` (plain socket, no integrity work: the baseline, 3.8 GB/s in one process),
``tcp-sha256`` (plain socket + the sha256 the fetch client does), ``tcp-chacha`` (plain socket
carrying the same ChaCha20-Poly1305 messages of <= 65,535 bytes as Noise, + sha256: roughly
what any Noise transport in Python pays; a simple loop, not a tuned floor), ``libp2p-stock``
(py-libp2p as shipped), ``libp2p-fast`` (with `p2pcache.net.fastpath`). ``--profile DIR`` writes
cProfile stats of both processes per libp2p mode and prints the top functions (profiling slows
the run; figures then are not throughput figures).
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


_NOISE_PT = 65535 - 16  # max plaintext per Noise transport message


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")  # Noise ChaChaPoly nonce


async def serve_tcp(mb: int, cipher: bool) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    blob = _blob(mb)
    digest = hashlib.sha256(blob).digest()
    aead = ChaCha20Poly1305(bytes(32))

    async def handler(s: trio.SocketStream) -> None:
        n = 0
        while (await s.receive_some(1)) == b"g":
            await s.send_all(digest)
            view = memoryview(blob)
            if not cipher:
                for off in range(0, len(blob), 1 << 20):
                    await s.send_all(view[off : off + (1 << 20)])
                continue
            # As Noise: one AEAD message per <= 65,519 plaintext bytes, 2-byte length prefix,
            # ~1 MB per socket write (what the fast path does).
            parts: list[bytes] = []
            for off in range(0, len(blob), _NOISE_PT):
                ct = aead.encrypt(_nonce(n), view[off : off + _NOISE_PT], None)
                n += 1
                parts += (len(ct).to_bytes(2, "big"), ct)
                if len(parts) >= 32:
                    await s.send_all(b"".join(parts))
                    parts = []
            if parts:
                await s.send_all(b"".join(parts))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print("READY", listeners[0].socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as n:
        n.start_soon(trio.serve_listeners, handler, listeners)
        await trio.to_thread.run_sync(sys.stdin.read)
        n.cancel_scope.cancel()


async def client_tcp(port: int, mb: int, runs: int, mode: str) -> list[float]:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(bytes(32))
    out = []
    size = mb << 20
    nonce = 0
    s = await trio.open_tcp_stream("127.0.0.1", port)
    for i in range(runs + 1):
        t0 = time.perf_counter()
        await s.send_all(b"g")
        digest = b""
        while len(digest) < 32:
            digest += await s.receive_some(32 - len(digest))
        if mode == "tcp-chacha":
            body = bytearray(size)
            dst = memoryview(body)
            done = 0
            raw = bytearray()
            while done < size:
                raw += await s.receive_some(1 << 20)
                pos = 0
                with memoryview(raw) as rv:
                    while len(raw) - pos >= 2:
                        ln = int.from_bytes(rv[pos : pos + 2], "big")
                        if len(raw) - pos - 2 < ln:
                            break
                        pt = aead.decrypt(_nonce(nonce), rv[pos + 2 : pos + 2 + ln], None)
                        nonce += 1
                        dst[done : done + len(pt)] = pt
                        done += len(pt)
                        pos += 2 + ln
                del raw[:pos]
            buf: bytes | bytearray = body
        else:
            buf = bytearray()
            while len(buf) < size:
                buf += await s.receive_some(min(size - len(buf), 1 << 20))
        if mode != "tcp-raw":
            assert hashlib.sha256(buf).digest() == digest  # the fetch client's integrity work
        if i:
            out.append(time.perf_counter() - t0)
    await s.aclose()
    return out


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
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


def _client(args: list[str]) -> list[float]:
    """One client process (the fast path patches py-libp2p process-wide, so stock and fast
    clients must not share a process); it prints its timings as the last line."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]


def _run(fn, *args, prof: str | None = None):  # type: ignore[no-untyped-def]
    """trio.run, under cProfile when ``prof`` names an output file."""
    if not prof:
        return trio.run(fn, *args)
    import cProfile

    pr = cProfile.Profile()
    try:
        return pr.runcall(trio.run, fn, *args)
    finally:
        pr.dump_stats(prof)


def _top(path: str, n: int = 18) -> None:
    import pstats

    print(f"\n--- {path}: top {n} by own time ---")
    pstats.Stats(path).sort_stats("tottime").print_stats(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="timed fetches per client process")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds; each runs every mode once, interleaved"
    )
    ap.add_argument("--role", default="bench")
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--cipher", type=int, default=0)
    ap.add_argument("--addr", default="")
    ap.add_argument("--mode", default="")
    ap.add_argument("--modes", default="tcp-raw,tcp-sha256,tcp-chacha,libp2p-stock,libp2p-fast")
    ap.add_argument("--profile", default="", help="directory for cProfile stats of both processes")
    a = ap.parse_args()
    prof = (lambda name: str(Path(a.profile) / name)) if a.profile else (lambda name: None)
    tag = "fast" if a.fast else "stock"
    if a.role == "serve-libp2p":
        _run(serve_libp2p, a.mb, bool(a.fast), prof=prof(f"server-{tag}.prof"))
        return
    if a.role == "serve-tcp":
        trio.run(serve_tcp, a.mb, bool(a.cipher))
        return
    if a.role == "client-libp2p":
        secs = _run(
            client_libp2p, a.addr, a.mb, a.runs, bool(a.fast), prof=prof(f"client-{tag}.prof")
        )
        print(" ".join(f"{x:.6f}" for x in secs))
        return
    if a.role == "client-tcp":
        secs = trio.run(client_tcp, int(a.addr), a.mb, a.runs, a.mode)
        print(" ".join(f"{x:.6f}" for x in secs))
        return
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    load0 = os.getloadavg()[0]  # other work on the machine skews loopback figures: report it
    servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
    samples: dict[str, list[float]] = {m: [] for m in modes}
    extra = ["--profile", a.profile] if a.profile else []
    try:
        for m in modes:
            if m.startswith("tcp"):
                servers[m] = _spawn(
                    [
                        "--role",
                        "serve-tcp",
                        "--mb",
                        str(a.mb),
                        "--cipher",
                        str(int(m == "tcp-chacha")),
                    ]
                )
            else:
                servers[m] = _spawn(
                    [
                        "--role",
                        "serve-libp2p",
                        "--mb",
                        str(a.mb),
                        "--fast",
                        str(int(m == "libp2p-fast")),
                        *extra,
                    ]
                )
        for _ in range(a.rounds):
            for m in modes:
                common = ["--addr", servers[m][1], "--mb", str(a.mb), "--runs", str(a.runs)]
                if m.startswith("tcp"):
                    samples[m] += _client(["--role", "client-tcp", "--mode", m, *common])
                else:
                    samples[m] += _client(
                        [
                            "--role",
                            "client-libp2p",
                            "--fast",
                            str(int(m == "libp2p-fast")),
                            *common,
                            *extra,
                        ]
                    )
    finally:
        for p, _ in servers.values():
            _stop(p)
    print(
        f"\n{a.mb} MB value, loopback, separate processes; {a.rounds} interleaved rounds "
        f"x {a.runs} "
        f"fetches (+1 warm-up each); 1-min load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    print(f"{'transport':<14} {'median s':>9} {'MB/s':>8} {'min s':>7} {'max s':>7} {'n':>3}")
    for m in modes:
        secs = samples[m]
        med = statistics.median(secs)
        print(
            f"{m:<14} {med:9.3f} {(a.mb << 20) / med / 1e6:8.1f} {min(secs):7.3f} "
            f"{max(secs):7.3f} {len(secs):3d}"
        )
    if a.profile:
        for f in sorted(Path(a.profile).glob("*.prof")):
            _top(str(f))


if __name__ == "__main__":
    main()
