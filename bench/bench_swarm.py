"""Discovery and advert propagation in a swarm of real nodes over shaped links.

N `p2pcache node run` processes (default 12), each in its own network namespace on one
bridge, every access link delayed (default 50 ms each way, so 100 ms one way between two
nodes, 200 ms RTT); node 0 starts first, every other node gets only node 0's address.

Measured:
- join: process start -> first provider of the model known (discovery), network start ->
  first provider, and process start -> first GossipSub mesh peer on the ad topic (polled
  every 50 ms after the node is ready: an upper bound);
- advert propagation: a new entry computed at one node (its store time) -> each other node's
  index lists that node as a provider (``/admin/providers?wait_s=``: returns on the advert's
  arrival), over ``--entries`` entries at different producers;
- bytes per node per second on each node's interface (all traffic: gossip, discovery, ...)
  while idle and while the entries were published;
- late joiners (``--late-joiners K``): once the swarm is up and has published its entries,
  K more nodes start one at a time, each alone (same link shape, only node 0's address; the
  earlier ones keep running): process start -> first provider known and -> first mesh peer,
  and where that time goes, from the node's own log (info level for these nodes) and
  ``/admin/status``: interpreter + imports, model load (``load_s``), network start, first
  bootstrap connection, HTTP ready.

Needs root and ``ip netns``; links are shaped by tc netem, or by the userspace shaper
(`p2pcache.testbed.shaper`) where the kernel lacks sch_netem. Run under the heavy lock:

    flock -x /tmp/p2pcache-heavy.lock .venv/bin/python bench/bench_swarm.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from p2pcache.node.cluster import stop_all
from p2pcache.testbed import LinkShape, Testbed, cleanup_prefix
from p2pcache.testbed.nodes import NsNode, start_node_group

PREFIX = "p2pbench"
SUBNET = "10.79.0.0/24"
ENV = {"P2PCACHE_KV_PREFIX": "false"}
WAIT_S = 30.0  # longest wait for one advert at one node
JOIN_TIMEOUT_S = 120.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def status(c: httpx.Client) -> dict[str, Any]:
    return c.get("/admin/status").json()


def mesh_peers(c: httpx.Client) -> int:
    peers = c.get("/admin/peers").json()["peers"]
    return sum(1 for p in peers if p.get("mesh"))


def wait_mesh(c: httpx.Client, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mesh_peers(c) >= 1:
            return time.time()
        time.sleep(0.05)  # polling another process's state, bounded by the deadline
    return None


def join_times(nodes: list[NsNode], clients: dict[str, httpx.Client]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"proc_provider": [], "net_provider": []}
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for n in nodes:
        while True:
            d = status(clients[n.name])["discovery"]
            if d.get("first_provider_at") is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n.name} found no provider in {JOIN_TIMEOUT_S} s")
            time.sleep(0.1)  # polling another process's state, bounded by the deadline
        out["proc_provider"].append(d["first_provider_at"] - n.spawned_at)
        out["net_provider"].append(d["first_provider_at"] - d["started_at"])
    return out


def propagate(
    producer: NsNode, others: list[NsNode], clients: dict[str, httpx.Client], prompt: str
) -> tuple[list[float], float]:
    """Delays (s) from the entry's store time at ``producer`` to each other node knowing
    ``producer`` provides it; also the compute time."""
    arrived: dict[str, float] = {}
    key_box: dict[str, str] = {}
    ready = threading.Event()

    def wait_at(n: NsNode) -> None:
        ready.wait(timeout=120)
        key = key_box.get("key")
        if key is None:
            return
        with n.client(timeout=WAIT_S + 10) as c:
            r = c.get("/admin/providers", params={"key": key, "wait_s": WAIT_S})
            if producer.node.peer_id in r.json().get("providers", []):
                arrived[n.name] = time.time()

    # The waiters ask as soon as the completion returns the key (right after the store;
    # adverts leave after a 0.25 s batch and 100 ms of links): an advert that is already
    # there is returned at once and timed late, so these delays are upper bounds.
    threads = [threading.Thread(target=wait_at, args=(n,)) for n in others]
    for t in threads:
        t.start()
    body = {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "share": True}
    t_req = time.time()
    c = clients[producer.name]
    body["model"] = status(c)["model"]
    r = c.post("/v1/completions", json=body)
    doc = r.json()
    key_box["key"] = doc["x_cache"]["input_sha256"]
    ready.set()
    for t in threads:
        t.join(timeout=WAIT_S + 30)
    entries = c.get("/admin/cache", params={"entries": 8}).json()["entries"]
    stored = next(e["inserted_at"] / 1000 for e in entries if e["input_sha256"] == key_box["key"])
    missing = [n.name for n in others if n.name not in arrived]
    if missing:
        print(f"  advert of {producer.name} never reached {missing}", file=sys.stderr)
    return [arrived[n.name] - stored for n in others if n.name in arrived], stored - t_req


def counters(tb: Testbed, nodes: list[NsNode]) -> list[int]:
    return [sum(tb.counters(n.link)) for n in nodes]


def ad_bytes(nodes: list[NsNode], clients: dict[str, httpx.Client]) -> list[int]:
    """Advert payload bytes each node published plus those it accepted (first copies)."""
    out = []
    for n in nodes:
        st = clients[n.name].get("/admin/peers").json()["stats"]
        out.append(st["published"]["advert_bytes"] + st["ads"]["accepted_bytes"])
    return out


def log_time(record: dict[str, Any]) -> float:
    """A JSON log record's ``ts`` (UTC, ms) as a Unix time, the clock of ``spawned_at``."""
    return datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def late_join(n: NsNode, c: httpx.Client) -> dict[str, float] | None:
    """Seconds from ``n``'s process start to each step of its join (None: no provider or no
    mesh peer within the deadline). The node is polled from its ready line on, every 50 ms:
    the first provider's time is the node's own record, the mesh peer's an upper bound."""
    provider: dict[str, Any] | None = None
    mesh: float | None = None
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline and (provider is None or mesh is None):
        if provider is None:
            d = status(c)["discovery"]
            if d.get("first_provider_at") is not None:
                provider = d
        if mesh is None and mesh_peers(c) >= 1:
            mesh = time.time()
        time.sleep(0.05)  # polling another process's state, bounded by the deadline
    if provider is None or mesh is None:
        print(
            f"  late joiner {n.name}: provider {provider is not None}, mesh {mesh is not None}",
            file=sys.stderr,
        )
        return None
    t0 = n.spawned_at
    out = {
        "provider": provider["first_provider_at"] - t0,
        "mesh": mesh - t0,
        "net_provider": provider["first_provider_at"] - provider["started_at"],
        "network_start": provider["started_at"] - t0,
    }
    for r in n.node.log_records():
        msg = r.get("msg", "")
        if msg == "model loaded" and "load_s" in r:
            out["load_s"] = float(r["load_s"])
            out["loaded"] = log_time(r) - t0
            out["load_begins"] = out["loaded"] - out["load_s"]
        elif msg.startswith("connected to bootstrap") and "bootstrap" not in out:
            out["bootstrap"] = log_time(r) - t0
        elif msg == "node ready":
            out["ready"] = log_time(r) - t0
    return out


def print_rows(rows: list[tuple[str, list[float]]]) -> None:
    print(f"{'measure':50} {'n':>4} {'p50':>10} {'p99':>10} {'max':>10}")
    for name, xs in rows:
        print(
            f"{name:50} {len(xs):>4} {pct(xs, 50):>10.3f} {pct(xs, 99):>10.3f}"
            f" {max(xs) if xs else float('nan'):>10.3f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--link-delay-ms", type=float, default=50.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--entries", type=int, default=8)
    ap.add_argument("--group", type=int, default=3, help="nodes started at once")
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--shaping", default="auto", choices=("auto", "netem", "relay"))
    ap.add_argument(
        "--late-joiners", type=int, default=3, help="nodes started alone once the swarm is up"
    )
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    cleanup_prefix(PREFIX)
    nodes: list[NsNode] = []
    clients: dict[str, httpx.Client] = {}
    shape = LinkShape(delay_ms=args.link_delay_ms, jitter_ms=args.jitter_ms)
    extra = ["--n-ctx", "2048", "--log-level", "warning"]
    # Late joiners log at info: their "model loaded" (load_s) and bootstrap lines time the join.
    late_extra = ["--n-ctx", "2048", "--log-level", "info", "--log-format", "json"]
    late: list[NsNode] = []
    lates: list[dict[str, float]] = []
    with Testbed(PREFIX, shaping=args.shaping) as tb:
        lan = tb.add_bridge("lan", SUBNET)
        links = [tb.host(f"n{i}", lan, shape=shape)[1] for i in range(args.nodes)]
        # Made now: a link added later restarts the relay shaper under the running swarm.
        late_links = [tb.host(f"late{i}", lan, shape=shape)[1] for i in range(args.late_joiners)]
        mesh_at: dict[str, float | None] = {}
        try:
            start_node_group(tb, links[:1], tmp, nodes, extra=extra, env=ENV)
            for g in range(1, args.nodes, args.group):
                group = start_node_group(
                    tb,
                    links[g : g + args.group],
                    tmp,
                    nodes,
                    bootstrap=[nodes[0].addr],
                    extra=extra,
                    env=ENV,
                )
                for n in group:
                    clients[n.name] = n.client()
                    mesh_at[n.name] = wait_mesh(clients[n.name], 60.0)
            clients[nodes[0].name] = nodes[0].client()
            joins = join_times(nodes[1:], clients)
            mesh_join = [
                t - n.spawned_at for n in nodes[1:] if (t := mesh_at.get(n.name)) is not None
            ]
            # Idle traffic: every node up and meshed, nothing new published.
            a0, c0, t0 = ad_bytes(nodes, clients), counters(tb, nodes), time.monotonic()
            time.sleep(args.idle_s)  # a measurement window, not synchronisation
            a1, c1, t1 = ad_bytes(nodes, clients), counters(tb, nodes), time.monotonic()
            idle = [(b - a) / (t1 - t0) for a, b in zip(c0, c1, strict=True)]
            ads_idle = [(b - a) / (t1 - t0) for a, b in zip(a0, a1, strict=True)]
            delays: list[float] = []
            computes: list[float] = []
            a2, c2, t2 = ad_bytes(nodes, clients), counters(tb, nodes), time.monotonic()
            for e in range(args.entries):
                producer = nodes[(1 + 5 * e) % len(nodes)]
                others = [n for n in nodes if n is not producer]
                prompt = f"Entry {e} of the swarm benchmark: name a colour"
                d, comp = propagate(producer, others, clients, prompt)
                delays += d
                computes.append(comp)
            a3, c3, t3 = ad_bytes(nodes, clients), counters(tb, nodes), time.monotonic()
            busy = [(b - a) / (t3 - t2) for a, b in zip(c2, c3, strict=True)]
            ads_busy = [(b - a) / (t3 - t2) for a, b in zip(a2, a3, strict=True)]
            known = [len(status(clients[n.name])["discovery"]["providers"]) for n in nodes]
            for link in late_links:  # one at a time, nothing else starting meanwhile
                (n,) = start_node_group(
                    tb, [link], tmp, late, bootstrap=[nodes[0].addr], extra=late_extra, env=ENV
                )
                clients[n.name] = n.client()
                if (lj := late_join(n, clients[n.name])) is not None:
                    lates.append(lj)
        finally:
            for c in clients.values():
                c.close()
            stop_all([n.node for n in nodes + late])

    rows = [
        ("join: process start -> first provider (s)", joins["proc_provider"]),
        ("join: network start -> first provider (s)", joins["net_provider"]),
        ("join: process start -> first mesh peer (s, <=)", mesh_join),
        ("advert: store -> provider known, per node (s)", delays),
        ("bytes/s per node, idle (rx+tx)", idle),
        ("bytes/s per node, publishing (rx+tx)", busy),
        ("advert payload bytes/s per node, idle (sent + accepted)", ads_idle),
        ("advert payload bytes/s per node, publishing (sent + accepted)", ads_busy),
        ("late join: process start -> first provider (s)", [x["provider"] for x in lates]),
        ("late join: network start -> first provider (s)", [x["net_provider"] for x in lates]),
        ("late join: process start -> first mesh peer (s, <=)", [x["mesh"] for x in lates]),
    ]
    # Where a late joiner's time goes: process start -> each step, in the order they happen.
    steps = [
        ("load_begins", "imports done, load begins"),
        ("loaded", "model + store loaded"),
        ("network_start", "network started"),
        ("ready", "HTTP ready"),
        ("bootstrap", "bootstrap connected"),
        ("provider", "first provider known"),
    ]
    phases = [
        (f"late: start -> {label} (s)", [x[k] for x in lates if k in x]) for k, label in steps
    ]
    phases.append(("late: model load_s (s)", [x["load_s"] for x in lates if "load_s" in x]))
    print(
        f"\n{args.nodes} nodes, {args.link_delay_ms:g} ms per link each way"
        f" (jitter {args.jitter_ms:g} ms), shaping: {tb.shaping}, entries: {args.entries}"
    )
    print_rows(rows)
    expected = args.entries * (args.nodes - 1)
    print(f"adverts arrived: {len(delays)}/{expected}; providers known per node: {known}")
    print(f"\nlate joiners: {len(lates)}/{args.late_joiners} joined; where the time goes:")
    print_rows(phases)
    if args.json:
        raw = {
            "args": vars(args) | {"json": str(args.json)},
            "rows": dict(rows),
            "known": known,
            "late": lates,
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 0 if len(delays) == expected and len(lates) == args.late_joiners else 1


if __name__ == "__main__":
    sys.exit(main())
