"""Prometheus metrics of one node (its own registry, so several nodes can share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LEVELS = ("L0", "L1", "L2", "L3")
disable_created_metrics()  # no *_created series: they double the output for no use here


class _Live(Collector):
    """Values read at scrape time from the node's parts."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        v = self.read()
        g = GaugeMetricFamily("p2pcache_queue_depth", "Requests waiting for the model.")
        g.add_metric([], v["queue_depth"])
        yield g
        g = GaugeMetricFamily("p2pcache_model_busy", "1 while the model is running a request.")
        g.add_metric([], 1 if v["running"] else 0)
        yield g
        c = CounterMetricFamily("p2pcache_model_runs", "Local inference runs (L3 computations).")
        c.add_metric([], v["computations"])
        yield c
        g = GaugeMetricFamily("p2pcache_store_entries", "Entries in the local store.")
        g.add_metric([], v["entries"])
        yield g
        g = GaugeMetricFamily("p2pcache_store_bytes", "Bytes of entries in the local store.")
        g.add_metric([], v["bytes"])
        yield g
        g = GaugeMetricFamily("p2pcache_peers", "Peers known to the network service.")
        g.add_metric([], v["peers"])
        yield g
        g = GaugeMetricFamily(
            "p2pcache_peer_score", "Reputation score per peer.", labels=["peer_id"]
        )
        for peer_id, score in v["peer_scores"]:
            g.add_metric([peer_id], score)
        yield g


class NodeMetrics:
    """Counters the node updates; the network service increments the byte and
    verification counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "p2pcache_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.answers = Counter(
            "p2pcache_answers",
            "Answers by the cache level that served them.",
            ["level"],
            registry=r,
        )
        self.latency = Histogram(
            "p2pcache_answer_seconds",
            "Time to answer by cache level.",
            ["level"],
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.single_flight = Counter(
            "p2pcache_single_flight_joins",
            "Requests that waited on an identical in-flight request.",
            registry=r,
        )
        self.rejected = Counter(
            "p2pcache_rejected",
            "Requests refused for overload or shutdown.",
            ["reason"],
            registry=r,
        )
        self.draft_outcomes = Counter(
            "p2pcache_draft_outcomes",
            "Peer answers walked as drafts, by outcome (match, near_tie, lie, malformed).",
            ["outcome"],
            registry=r,
        )
        self.draft_accepted = Histogram(
            "p2pcache_draft_accepted_tokens",
            "Tokens of a peer's answer accepted before the first divergence (or all).",
            registry=r,
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        )
        self.bytes_fetched = Counter(
            "p2pcache_bytes_fetched", "Bytes fetched from peers.", registry=r
        )
        self.bytes_served = Counter("p2pcache_bytes_served", "Bytes served to peers.", registry=r)
        self.verification_failures = Counter(
            "p2pcache_verification_failures", "Peer answers that failed verification.", registry=r
        )
        for level in LEVELS:  # export zeros so dashboards see every level from the start
            self.answers.labels(level)
            self.latency.labels(level)

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        """Read ``read()`` at every scrape (the node's live values, see `_Live`)."""
        self.registry.register(_Live(read))

    def answers_by_level(self) -> dict[str, int]:
        """Answers served so far, per cache level (``/admin/cache``)."""
        return {level: int(self.answers.labels(level)._value.get()) for level in LEVELS}

    def render(self) -> bytes:
        return generate_latest(self.registry)
