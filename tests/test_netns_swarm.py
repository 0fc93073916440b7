"""Twelve real nodes, each in its own network namespace on one private bridge, each given only
the first node's address: discovery finds every provider of the model, one node computes an
answer, and every other node learns its provider and answers the entry from L2.

Needs root and ``ip netns`` (skipped otherwise). Nodes start a few at a time (2 CPU cores);
each wait is bounded. Run under the heavy lock:

    flock -x /tmp/p2pcache-heavy.lock .venv/bin/pytest tests/test_netns_swarm.py -v
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from p2pcache.node.cluster import stop_all
from p2pcache.testbed import Testbed, cleanup_prefix, netns_available
from p2pcache.testbed.nodes import NsNode, start_node_group
from tests.net_harness import until

_why = netns_available()
pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(_why is not None, reason=f"netns testbed unavailable: {_why}"),
]

N_NODES = int(os.environ.get("P2PCACHE_NETNS_NODES", "12"))
GROUP = 3  # nodes loading the model at once (2 cores: more only queue behind each other)
PREFIX = "p2pns"
PREFIX_MDNS = "p2pmdns"
SUBNET = "10.77.0.0/24"
EXTRA = ["--n-ctx", "2048", "--log-level", "info"]
ENV = {"P2PCACHE_KV_PREFIX": "false"}  # decoder_final entries only, as in test_net_nodes
DISCOVERY_TIMEOUT_S = 60.0
AD_TIMEOUT_S = 40.0
FORGET_TIMEOUT_S = 60.0  # DiscoveryConfig: forget_s 15 s + a 5 s round, with margin
MAX_TOKENS = 8


@dataclass
class Swarm:
    nodes: list[NsNode]
    http: dict[str, httpx.Client]
    model: str

    def get(self, n: NsNode, path: str, **params: Any) -> dict[str, Any]:
        r = self.http[n.name].get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def complete(self, n: NsNode, prompt: str) -> tuple[dict[str, Any], str]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "share": True,
        }
        r = self.http[n.name].post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json(), r.headers["x-cache-level"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("netns")
    cleanup_prefix(PREFIX)  # leftovers of a crashed earlier run
    nodes: list[NsNode] = []
    clients: dict[str, httpx.Client] = {}
    with Testbed(PREFIX) as tb:
        lan = tb.add_bridge("lan", SUBNET)
        links = [tb.host(f"n{i}", lan)[1] for i in range(N_NODES)]
        try:
            start_node_group(tb, links[:1], tmp, nodes, extra=EXTRA, env=ENV)
            first = nodes[0].addr
            for g in range(1, N_NODES, GROUP):
                start_node_group(
                    tb, links[g : g + GROUP], tmp, nodes, bootstrap=[first], extra=EXTRA, env=ENV
                )
            clients = {n.name: n.client() for n in nodes}
            yield Swarm(nodes, clients, nodes[0].node.ready["model"])
        finally:
            for c in clients.values():
                c.close()
            codes = stop_all([n.node for n in nodes])
            for n in nodes:
                if codes.get(n.name) != 0:
                    print(f"--- {n.name} log tail ---\n{n.node.log_tail(40)}")


def test_mdns_finds_a_lan_peer_without_any_bootstrap_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # First in the module: it runs before the 12-node swarm starts (2 cores).
    tmp = tmp_path_factory.mktemp("mdns")
    cleanup_prefix(PREFIX_MDNS)
    nodes: list[NsNode] = []
    with Testbed(PREFIX_MDNS) as tb:
        lan = tb.add_bridge("lan", "10.76.0.0/24")
        links = [tb.host(f"m{i}", lan)[1] for i in range(2)]
        for link in links:
            tb.enable_multicast(link)
        try:
            start_node_group(tb, links, tmp, nodes, extra=[*EXTRA, "--mdns"], env=ENV)
            for n, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
                with n.client() as c:

                    def found(c: httpx.Client = c, other: NsNode = other) -> bool:
                        d = c.get("/admin/status").json()["discovery"]
                        return other.node.peer_id in {p["peer_id"] for p in d["providers"]}

                    until(found, DISCOVERY_TIMEOUT_S, f"{n.name} finding {other.name} by mDNS")
                    st = c.get("/admin/status").json()
                    assert st["bootstrap"] == [] and st["discovery"]["mdns"] is True
        finally:
            stop_all([n.node for n in nodes])


def test_every_node_discovers_every_provider_from_one_bootstrap_address(swarm: Swarm) -> None:
    ids = {n.name: n.node.peer_id for n in swarm.nodes}
    for n in swarm.nodes:
        st = swarm.get(n, "/admin/status")
        assert st["bootstrap"] == ([] if n is swarm.nodes[0] else [swarm.nodes[0].addr])
    for n in swarm.nodes:
        others = {pid for name, pid in ids.items() if name != n.name}

        def knows_all(n: NsNode = n, others: set[str] = others) -> bool:
            d = swarm.get(n, "/admin/status")["discovery"]
            return {p["peer_id"] for p in d["providers"]} >= others

        until(knows_all, DISCOVERY_TIMEOUT_S, f"{n.name} knowing all {len(others)} providers")
    # Discovery dialled beyond the bootstrap node: the mesh is not a star around node 0.
    beyond = 0
    for n in swarm.nodes[1:]:
        peers = {p["peer_id"] for p in swarm.get(n, "/admin/peers")["peers"]}
        beyond += bool(peers - {ids["n0"]})
        d = swarm.get(n, "/admin/status")["discovery"]
        assert d["last_lookup"]["points"] == 1 and d["first_provider_at"] is not None
    assert beyond == len(swarm.nodes) - 1


def test_one_node_computes_all_others_answer_from_l2(swarm: Swarm) -> None:
    producer = swarm.nodes[len(swarm.nodes) // 2]
    prompt = "The tallest mountain on Earth is"
    doc, level = swarm.complete(producer, prompt)
    assert level == "L3" and doc["x_cache"]["level"] == "L3"
    key = doc["x_cache"]["input_sha256"]
    for n in swarm.nodes:
        if n is producer:
            continue
        found = swarm.get(n, "/admin/providers", key=key, wait_s=AD_TIMEOUT_S)["providers"]
        assert producer.node.peer_id in found, (n.name, found)
    for n in swarm.nodes:
        if n is producer:
            continue
        got, level = swarm.complete(n, prompt)
        x = got["x_cache"]
        assert level == "L2" and x["level"] == "L2", (n.name, x)
        assert x["input_sha256"] == key and x["peer"]["verified"] is True
        assert x["peer"]["producer"] == producer.node.peer_id


def test_a_node_that_leaves_is_forgotten(swarm: Swarm) -> None:
    gone = swarm.nodes[-1]
    assert gone.node.stop() == 0
    for n in swarm.nodes[:-1]:

        def forgot(n: NsNode = n) -> bool:
            d = swarm.get(n, "/admin/status")["discovery"]
            return gone.node.peer_id not in {p["peer_id"] for p in d["providers"]}

        until(forgot, FORGET_TIMEOUT_S, f"{n.name} forgetting {gone.name}")
