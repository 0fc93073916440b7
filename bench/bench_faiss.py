"""Flat or HNSW? Where L1's FAISS index switches.

Unit vectors of dimension 384 (all-MiniLM-L6-v2), clustered like prompt embeddings (a few
thousand topics, each a spread of paraphrases): search latency (one query, k=4, as L1 does),
recall@1 of HNSW against the exact flat search, build time and memory, at growing sizes.

Usage: flock /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_faiss.py
"""

from __future__ import annotations

import statistics
import time

import faiss
import numpy as np

DIM = 384


def vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((max(n // 20, 1), DIM)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed_search(index: faiss.Index, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    ts, ids = [], []
    for q in queries:
        t = time.perf_counter()
        _, i = index.search(q[None, :], 4)
        ts.append((time.perf_counter() - t) * 1000)
        ids.append(i[0, 0])
    ts.sort()
    return statistics.median(ts), ts[int(len(ts) * 0.99) - 1], np.asarray(ids)


def main() -> None:
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    print(
        "| vectors | flat p50 ms | flat p99 ms | HNSW p50 ms | HNSW p99 ms | HNSW recall@1 "
        "| HNSW build s | flat MB | HNSW MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (1_000, 5_000, 20_000, 50_000, 100_000, 200_000):
        x = vectors(n, rng)
        queries = x[rng.integers(0, n, 300)] + 0.05 * rng.standard_normal((300, DIM)).astype(
            np.float32
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(x)
        f50, f99, exact = timed_search(flat, queries)
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        t = time.perf_counter()
        hnsw.add(x)
        build = time.perf_counter() - t
        h50, h99, approx = timed_search(hnsw, queries)
        recall = float(np.mean(approx == exact))
        size = lambda ix: faiss.serialize_index(ix).nbytes / 1e6  # noqa: E731
        print(
            f"| {n:,} | {f50:.3f} | {f99:.3f} | {h50:.3f} | {h99:.3f} | {recall:.3f} | {build:.1f} "
            f"| {size(flat):.0f} | {size(hnsw):.0f} |"
        )


if __name__ == "__main__":
    main()
