"""HTTP API throughput and latency on L0 hits, concurrent clients against a node process.

    flock /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_http.py [--clients 16]
                                                                        [--seconds 10] [--runs 3]

Starts `p2pcache node run` as a separate process (default config: JSON access logs at info),
computes --prompts distinct answers (L3), then --clients concurrent keep-alive connections
send those requests in a closed loop for --seconds (bounded by --max-requests too); every
answer must be a 200 with X-Cache-Level L0. The load generator is a minimal HTTP/1.1 client
on trio sockets in this process, so that client overhead stays small on a 2-core machine.
Prints one table; each figure is the median over --runs runs (latency percentiles are per
run, over all requests of the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import trio
from rich.console import Console
from rich.table import Table

from p2pcache.node.cluster import start_node


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def build_request(host: str, port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload


async def read_response(
    stream: trio.SocketStream, buf: bytearray
) -> tuple[int, dict[bytes, bytes], bytes]:
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("connection closed")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get(b"content-length", b"0"))
    body = bytearray(rest)
    while len(body) < n:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("connection closed mid-body")
        body += data
    buf[:] = body[n:]
    return status, headers, bytes(body[:n])


async def load(
    host: str, port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int
) -> dict:
    latencies: list[float] = []
    levels: dict[str, int] = {}
    errors = 0
    stop_at = time.perf_counter() + seconds
    sent = 0

    async def client(i: int) -> None:
        nonlocal errors, sent
        stream = await trio.open_tcp_stream(host, port)
        buf = bytearray()
        j = i
        try:
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                req = requests[j % len(requests)]
                j += 1
                t0 = time.perf_counter()
                await stream.send_all(req)
                status, headers, _ = await read_response(stream, buf)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    errors += 1
                lvl = headers.get(b"x-cache-level", b"?").decode()
                levels[lvl] = levels.get(lvl, 0) + 1
                if (
                    headers.get(b"connection", b"").lower() == b"close"
                ):  # hypercorn: 1000 requests per connection
                    await stream.aclose()
                    stream = await trio.open_tcp_stream(host, port)
                    buf.clear()
        finally:
            await stream.aclose()

    t0 = time.perf_counter()
    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
    wall = time.perf_counter() - t0
    return {
        "n": len(latencies),
        "rps": len(latencies) / wall,
        "p50": pct(latencies, 50),
        "p90": pct(latencies, 90),
        "p99": pct(latencies, 99),
        "max": max(latencies),
        "errors": errors,
        "levels": levels,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument(
        "--log-level", default="info", help="the node's log level (info logs every request)"
    )
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the reference row: hypercorn serving a trivial ASGI app, same client",
    )
    args = ap.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory() as tmp:
        node = start_node(
            "bench", Path(tmp) / "node", extra=("--n-ctx", "1024", "--log-level", args.log_level)
        )
        try:
            model = node.ready["model"]
            bodies = {
                "/v1/completions": [
                    {"model": model, "prompt": f"Fact number {i} about the sea:", "max_tokens": 16}
                    for i in range(args.prompts)
                ],
                "/v1/chat/completions": [
                    {
                        "model": model,
                        "max_tokens": 16,
                        "messages": [
                            {"role": "user", "content": f"Tell me fact number {i} about the sea."}
                        ],
                    }
                    for i in range(args.prompts)
                ],
            }
            with httpx.Client(timeout=300) as http:  # fill the cache (L3) once
                for path, bs in bodies.items():
                    for b in bs:
                        r = http.post(node.url + path, json=b)
                        r.raise_for_status()
            host, port = node.url.removeprefix("http://").rsplit(":", 1)
            rows = []
            for path, bs in bodies.items():
                reqs = [build_request(host, int(port), path, b) for b in bs]
                for clients in args.clients:
                    runs = [
                        trio.run(
                            load, host, int(port), reqs, clients, args.seconds, args.max_requests
                        )
                        for _ in range(args.runs)
                    ]
                    for r in runs:
                        assert r["errors"] == 0 and set(r["levels"]) == {"L0"}, r
                    med = {
                        k: statistics.median(r[k] for r in runs)
                        for k in ("n", "rps", "p50", "p90", "p99", "max")
                    }
                    rows.append((path, clients, med))
                    print(
                        json.dumps({"endpoint": path, "clients": clients, **med}), flush=True
                    )  # kept if a later step fails
        finally:
            code = node.stop()
            assert code == 0, node.log_tail()

    if args.reference:  # the HTTP server's own floor: hypercorn (trio) + a trivial ASGI app
        import signal
        import subprocess
        import sys

        from p2pcache.node.cluster import NodeProcess, wait_ready

        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("_null_asgi.py"))],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            ref = NodeProcess("null-asgi", proc, Path(tmp), Path(tmp) / "log")
            try:
                wait_ready(ref, timeout=60)
                host, port = ref.ready["http"].removeprefix("http://").rsplit(":", 1)
                req = [
                    build_request(host, int(port), "/v1/completions", bodies["/v1/completions"][0])
                ]
                for clients in args.clients:
                    runs = [
                        trio.run(
                            load, host, int(port), req, clients, args.seconds, args.max_requests
                        )
                        for _ in range(args.runs)
                    ]
                    med = {
                        k: statistics.median(r[k] for r in runs)
                        for k in ("n", "rps", "p50", "p90", "p99", "max")
                    }
                    rows.append(("hypercorn + empty ASGI app (floor)", clients, med))
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)

    table = Table(
        title=f"L0 hits over HTTP (median of {args.runs} runs of {args.seconds:.0f} s; "
        f"node log level {args.log_level})"
    )
    table.min_width = 100
    for c in (
        "endpoint",
        "clients",
        "requests/run",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
    ):
        table.add_column(c, justify="left" if c == "endpoint" else "right")
    for path, clients, m in rows:
        table.add_row(
            path,
            str(clients),
            f"{m['n']:.0f}",
            f"{m['rps']:,.0f}",
            f"{m['p50']:.2f}",
            f"{m['p90']:.2f}",
            f"{m['p99']:.2f}",
            f"{m['max']:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
