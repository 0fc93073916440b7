"""Time to first token on node C for a long prompt whose prefix node A computed: resumed from
KV chunks fetched from A (L2 for KV) vs computed cold on C vs resumed from C's own chunks.

Two real node daemons (`p2pcache node run`) on loopback, C bootstrapped to A, KV prefix on,
spot-checks off (`kv_spot_check_rate=0`: the fetch path itself is measured; a spot-check costs
one cold prefill on top). For each size, `--reps` distinct prefixes (a document + question):
A answers prefix + Q1 (stores and advertises its chunks); C then answers prefix + Q2 (fetch +
restore + prefill of the rest), prefix + Q3 (local prefix hit), and a never-seen document of
the same length (cold). One output token (max_tokens=1): the figure is TTFT as the server saw
it (`x_cache.timings.total_ms`). Medians.

    flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_kv_net.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from p2pcache.node.cluster import start_node, stop_all


def document(tag: str, sentences: int) -> str:
    body = " ".join(
        f"Clause {i} of the {tag} charter: member {i} keeps ledger {i * 7} and reports to "
        f"office {i % 9} every {i % 5 + 2} weeks."
        for i in range(sentences)
    )
    return f"Read the {tag} charter below.\n\n{body}\n\nQuestion: "


def ask(http: httpx.Client, url: str, model: str, prompt: str) -> dict[str, Any]:
    r = http.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "share": True},
    )
    r.raise_for_status()
    return r.json()["x_cache"]


def keys_of(http: httpx.Client, url: str, producer: str) -> int:
    r = http.get(f"{url}/admin/peers")
    r.raise_for_status()
    return int(r.json()["stats"]["index"]["providers"].get(producer, 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, nargs="+", default=[8, 36])  # ~450 and ~2,000 tokens
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-net-"))
    env = {
        "P2PCACHE_KV_PREFIX": "true",
        "P2PCACHE_KV_NET": "true",
        "P2PCACHE_KV_SPOT_CHECK_RATE": "0",
    }
    extra = ["--n-ctx", "4096", "--log-level", "warning"]
    nodes = []
    try:
        node_a = start_node("A", tmp / "a", extra=extra, env=env)
        nodes.append(node_a)
        node_c = start_node(
            "C", tmp / "c", extra=[*extra, "--bootstrap", node_a.ready["addrs"][0]], env=env
        )
        nodes.append(node_c)
        model = node_a.ready["model"]
        with httpx.Client(timeout=300) as http:
            ask(http, node_c.url, model, "Warm-up: say hello.")
            print(
                "| prompt tokens | cold on C (ms) | peer chunks on C (ms) | of which fetch (ms) "
                "| bytes fetched | "
                "local prefix on C (ms) | cold / peer |"
            )
            print("|---|---|---|---|---|---|---|")
            for n in a.sentences:
                cold, peer, fetch_ms, local, sizes, toks = [], [], [], [], [], []
                for r in range(a.reps):
                    doc = document(f"bench{n}-{r}-{time.time_ns()}", n)
                    before = keys_of(http, node_c.url, node_a.peer_id)
                    xa = ask(http, node_a.url, model, doc + "Who keeps ledger 14?")
                    want = (
                        before + 1 + xa["timings"]["prompt_tokens"] // 16
                    )  # its decoder_final + chunk tips
                    deadline = time.monotonic() + 60
                    while keys_of(http, node_c.url, node_a.peer_id) < want:  # A's adverts reach C
                        if time.monotonic() > deadline:
                            raise SystemExit("A's adverts did not reach C")
                        time.sleep(0.05)
                    x = ask(
                        http, node_c.url, model, doc + "Which office gets reports from member 5?"
                    )
                    if "kv_peer" not in x:
                        raise SystemExit(f"C did not fetch A's chunks: {x}")
                    peer.append(x["timings"]["total_ms"])
                    fetch_ms.append(x["kv_peer"]["fetch_ms"])
                    sizes.append(x["kv_peer"]["bytes"])
                    toks.append(x["timings"]["prompt_tokens"])
                    local.append(
                        ask(http, node_c.url, model, doc + "How often does member 3 report?")[
                            "timings"
                        ]["total_ms"]
                    )
                    fresh = document(f"cold{n}-{r}-{time.time_ns()}", n)
                    cold.append(
                        ask(
                            http,
                            node_c.url,
                            model,
                            fresh + "Which office gets reports from member 5?",
                        )["timings"]["total_ms"]
                    )
                m = statistics.median
                print(
                    f"| {int(m(toks))} | {m(cold):.0f} | {m(peer):.0f} | {m(fetch_ms):.0f} | "
                    f"{m(sizes) / 1e6:.1f} MB | {m(local):.0f} | {m(cold) / m(peer):.1f}x |",
                    flush=True,
                )
    finally:
        stop_all(nodes)


if __name__ == "__main__":
    main()
