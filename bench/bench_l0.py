"""L0 hit vs the L3 generation it replaces, and LMDB lookup latency at 100k entries.

    .venv/bin/python bench/bench_l0.py [--runs 5] [--entries 100000]

Prints one table; every figure is a median over --runs runs (lookups: percentiles over all).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2pcache.keys import SamplingParams
from p2pcache.local import LocalNode, NodeOptions
from p2pcache.resolver import Request
from p2pcache.store import Entry, Output, Store

PROMPTS = [
    "Write a long, detailed essay about the history of the printing press in Europe.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in great detail how a steam engine works, step by step.",
    "Write a long travel guide to the mountains of northern Italy.",
    "Describe in detail the life cycle of a star, from nebula to remnant.",
    "Write a long letter from a sailor to his family about a voyage across the ocean.",
    "Explain at length how bread is made, from wheat field to bakery.",
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_ladder(node: LocalNode, n_tokens: int, runs: int, hits_per_run: int) -> dict[str, float]:
    l3_ms, l0_ms, produced = [], [], []
    for i in range(runs):
        req = Request(
            prompt=PROMPTS[i % len(PROMPTS)],
            params=SamplingParams(max_tokens=n_tokens, seed=1000 * n_tokens + i, temperature=0.8),
        )
        a = trio.run(node.resolve, req)
        assert a.cache_level == "L3", a.cache_level
        l3_ms.append(a.timings.total_ms)
        produced.append(a.timings.completion_tokens)
        hits = []
        for _ in range(hits_per_run):
            t0 = time.perf_counter()
            b = trio.run(node.resolve, req)
            hits.append((time.perf_counter() - t0) * 1000)
            assert b.cache_level == "L0" and b.text == a.text
        l0_ms.append(statistics.median(hits))
    l3, l0 = statistics.median(l3_ms), statistics.median(l0_ms)
    return {"tokens": statistics.median(produced), "l3_ms": l3, "l0_ms": l0, "speedup": l3 / l0}


def fake_entry(i: int) -> Entry:
    key = hashlib.sha256(f"bench/{i}".encode()).hexdigest()
    return Entry(
        input_sha256=key,
        model_hash="b" * 64,
        cache_level="decoder_final",
        output=Output(tokens=list(range(256)), text="lorem ipsum " * 80),
        params={"seed": i},
    )


def bench_lookup(entries: int, lookups: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        t0 = time.perf_counter()
        with Store(path, durable=False) as s:  # bulk fill without an fsync per entry
            for i in range(entries):
                s.put(fake_entry(i))
        fill_s = time.perf_counter() - t0
        keys = [fake_entry(i).input_sha256 for i in range(entries)]
        rng = random.Random(0)
        with Store(path) as s:
            lat = []
            for _ in range(lookups):
                k = rng.choice(keys)
                t = time.perf_counter()
                e = s.get(k)
                lat.append((time.perf_counter() - t) * 1000)
                assert e is not None
            miss = []
            for i in range(lookups // 10):
                t = time.perf_counter()
                assert s.get(hashlib.sha256(f"absent/{i}".encode()).hexdigest()) is None
                miss.append((time.perf_counter() - t) * 1000)
            size = s.stats().file_bytes
    return {
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat),
        "miss_p99": pct(miss, 99),
        "fill_s": fill_s,
        "file_mb": size / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hits", type=int, default=50, help="L0 hits timed per run")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=20_000)
    args = ap.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory() as tmp, LocalNode.open(NodeOptions(data_dir=tmp)) as node:
        console.print(
            f"model {node.backend.config.model_path.name}, n_gpu_layers={node.backend.n_gpu_layers}"
        )
        rows = [(n, bench_ladder(node, n, args.runs, args.hits)) for n in (64, 256)]
    table = Table(title=f"L0 hit vs L3 generation (median of {args.runs} runs)")
    for c in ("max_tokens", "tokens made", "L3 generation ms", "L0 hit ms", "L0 speed-up"):
        table.add_column(c, justify="right")
    for n, r in rows:
        table.add_row(
            str(n),
            f"{r['tokens']:.0f}",
            f"{r['l3_ms']:.1f}",
            f"{r['l0_ms']:.3f}",
            f"{r['speedup']:,.0f}x",
        )
    console.print(table)

    lk = bench_lookup(args.entries, args.lookups)
    t2 = Table(title=f"LMDB lookup, {args.entries:,} entries, {args.lookups:,} random gets")
    for c in ("p50 ms", "p99 ms", "max ms", "miss p99 ms", "fill s", "file MB"):
        t2.add_column(c, justify="right")
    t2.add_row(
        *(f"{lk[k]:.3f}" for k in ("p50", "p99", "max", "miss_p99")),
        f"{lk['fill_s']:.1f}",
        f"{lk['file_mb']:.0f}",
    )
    console.print(t2)


if __name__ == "__main__":
    main()
