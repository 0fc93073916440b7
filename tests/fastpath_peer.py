"""One side of a `/otd/fetch/1.0.0` transfer in its own process, with or without the fast path.

    serve --fast 0|1 --mb N   serve a blob full of a plaintext marker; prints READY <multiaddr>
                              and serves until stdin closes
    fetch --fast 0|1 --addr A --mb N
                              fetch it once; prints one JSON line {"ok", "sha256" | "error"}

Used by tests/test_net_fastpath.py (the fast path patches py-libp2p process-wide, so each side
runs in its own process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import trio

from p2pcache.identity import Identity
from p2pcache.net import fastpath
from p2pcache.net.fetch import BlobSource, FetchError, FetchRequest, FetchServer, fetch
from p2pcache.net.host import HostConfig, dial, full_addrs, running_host

KEY = "ab" * 32
MODEL = "cd" * 32
MARKER = b"OTD-PLAINTEXT-MARKER-"


def blob(mb: int) -> bytes:
    n = mb << 20
    return (MARKER * (n // len(MARKER) + 1))[:n]


async def serve(mb: int) -> None:
    ident = Identity.load_or_create(Path(tempfile.mkdtemp()) / "identity.key")
    src = BlobSource()
    src.put(KEY, "kv_prefix", blob(mb))
    async with running_host(ident, HostConfig()) as host:
        FetchServer(ident, src).install(host)
        print("READY", full_addrs(host)[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


async def fetch_once(addr: str, mb: int) -> dict[str, object]:
    ident = Identity.load_or_create(Path(tempfile.mkdtemp()) / "identity.key")
    async with running_host(ident, HostConfig()) as host:
        info = await dial(host, addr)
        req = FetchRequest(KEY, MODEL, "kv_prefix", max_bytes=(mb + 1) << 20)
        try:
            got = await fetch(host, info.peer_id.to_base58(), req, timeout_s=30)
        except FetchError as exc:
            return {"ok": False, "error": repr(exc)}
        return {"ok": True, "sha256": hashlib.sha256(got.body).hexdigest(), "size": len(got.body)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("serve", "fetch"))
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--addr", default="")
    a = ap.parse_args()
    if a.fast:
        fastpath.install()
    if a.role == "serve":
        trio.run(serve, a.mb)
    else:
        print(json.dumps(trio.run(fetch_once, a.addr, a.mb)), flush=True)


if __name__ == "__main__":
    main()
