"""A short, bounded workload against running nodes; reports where answers came from.

    python -m p2pcache.node.workload --url http://127.0.0.1:18081 --url http://127.0.0.1:18082
                                     [--prompts 4]

Each prompt is asked on one node (computed, L3), again on the same node (L0), then on the
next node, after waiting (bounded) until that node has heard the first node's advert: L2
when the nodes share entries over the network (else L3). Requests send ``"share": true``.
Exit code 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import httpx

PROMPTS = [
    "What is the boiling point of water at sea level?",
    "Name the largest planet in the solar system.",
    "What is a prime number?",
    "Give one use of a hash function.",
    "What does a compiler do?",
    "Why is the sky blue?",
    "What is the capital of Japan?",
    "Define the word 'cache'.",
]


def wait_healthy(urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy within {timeout_s:.0f} s")
            time.sleep(0.5)  # poll interval while the node starts


def run(
    urls: list[str], prompts: int, max_tokens: int, deadline_s: float, advert_wait_s: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    model = httpx.get(f"{urls[0]}/v1/models", timeout=10).json()["data"][0]["id"]
    # nodes with the network layer list p2p addresses (open /p2p); only they can hear adverts
    networked = {u: bool(httpx.get(f"{u}/p2p", timeout=10).json().get("addrs")) for u in urls}
    # /admin/* answers other machines only with the node's token (the testbed sets one)
    token = os.environ.get("P2PCACHE_ADMIN_TOKEN")
    admin_headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows: list[dict[str, Any]] = []
    with httpx.Client(timeout=min(300.0, deadline_s)) as client:
        for i in range(prompts):
            q = PROMPTS[i % len(PROMPTS)] + (f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
            plan = [
                (urls[i % len(urls)], "first"),
                (urls[i % len(urls)], "same node"),
                (urls[(i + 1) % len(urls)], "other node"),
            ]
            key = None
            for url, what in plan:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workload ran past {deadline_s:.0f} s")
                if what == "other node" and key and networked.get(url):
                    # wait (bounded) for the first node's advert to reach this one, so the
                    # answer can come from the peer (L2) rather than racing the gossip
                    wait_s = max(0.0, min(advert_wait_s, deadline - time.monotonic()))
                    client.get(
                        f"{url}/admin/providers",
                        params={"key": key, "wait_s": wait_s},
                        headers=admin_headers,
                        timeout=wait_s + 10,
                    )
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": q}],
                    "max_tokens": max_tokens,
                    "share": True,
                }
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/chat/completions", json=body)
                ms = (time.perf_counter() - t0) * 1000
                row = {
                    "prompt": i,
                    "node": url,
                    "step": what,
                    "status": r.status_code,
                    "ms": round(ms, 2),
                }
                if r.status_code == 200:
                    row["level"] = r.json()["x_cache"]["level"]
                    key = r.json()["x_cache"]["input_sha256"]
                else:
                    row["error"] = r.text[:200]
                rows.append(row)
    levels: dict[str, list[float]] = {}
    for row in rows:
        if "level" in row:
            levels.setdefault(row["level"], []).append(row["ms"])
    summary = {
        lvl: {"count": len(v), "p50_ms": round(statistics.median(v), 2)}
        for lvl, v in sorted(levels.items())
    }
    return {
        "requests": len(rows),
        "errors": sum(1 for r in rows if r["status"] != 200),
        "levels": summary,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url", action="append", required=True, help="node HTTP URL (repeat for each node)"
    )
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--deadline-s", type=float, default=600.0)
    ap.add_argument(
        "--wait-s", type=float, default=300.0, help="wait this long for the nodes to be healthy"
    )
    args = ap.parse_args(argv)
    urls = [u.rstrip("/") for u in args.url]
    wait_healthy(urls, args.wait_s)
    result = run(urls, args.prompts, args.max_tokens, args.deadline_s)
    for row in result["rows"]:
        print(
            f"prompt {row['prompt']} {row['step']:<10} {row['node']:<28} "
            f"{row.get('level', row['status'])} "
            f"{row['ms']:>10.1f} ms"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
