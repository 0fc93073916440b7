"""`p2pcache node run` processes inside testbed namespaces, reachable over HTTP.

Each node listens for libp2p on its namespace address (``/ip4/10.x.y.z/tcp/4001``: a
listener on 0.0.0.0 would announce the host name's address, which in a namespace is not
its own) and serves HTTP on the namespace's 127.0.0.1, reached through a Unix socket
forwarder (`p2pcache.testbed.forward`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from p2pcache.node.cluster import READY_TIMEOUT_S, NodeProcess, node_command, wait_ready
from p2pcache.testbed.netns import Link, Testbed, TestbedError

HTTP_PORT = 8080
P2P_PORT = 4001
SOCKET_WAIT_S = 20.0


@dataclass
class NsNode:
    node: NodeProcess
    link: Link
    socket_path: Path
    spawned_at: float  # time.time() just before the process started

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def addr(self) -> str:
        """The node's libp2p address on the testbed network."""
        return f"/ip4/{self.link.ip}/tcp/{P2P_PORT}/p2p/{self.node.peer_id}"

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client whose requests reach this node (``base_url`` set)."""
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(
            transport=transport, base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=timeout
        )


def start_ns_node(
    tb: Testbed,
    link: Link,
    name: str,
    data_dir: Path,
    *,
    bootstrap: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    ready_timeout: float = READY_TIMEOUT_S,
) -> NsNode:
    """Start a node in ``link``'s namespace (and its HTTP forwarder); wait until ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sock = data_dir / "http.sock"
    fwd_cmd = [sys.executable, "-m", "p2pcache.testbed.forward", str(sock), "127.0.0.1"]
    tb.popen(link.ns, [*fwd_cmd, str(HTTP_PORT)], stdin=subprocess.DEVNULL)
    args = [*extra]
    for b in bootstrap:
        args += ["--bootstrap", b]
    cmd = node_command(
        data_dir,
        http=f"127.0.0.1:{HTTP_PORT}",
        listen=f"/ip4/{link.ip}/tcp/{P2P_PORT}",
        extra=args,
    )
    log_path = data_dir / "node.log"
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    spawned = time.time()
    with open(log_path, "ab") as log_file:
        proc = tb.popen(
            link.ns,
            cmd,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
    ns_node = NsNode(NodeProcess(name, proc, data_dir, log_path), link, sock, spawned)
    if wait:
        wait_node(ns_node, ready_timeout)
    return ns_node


def wait_node(n: NsNode, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the node printed its ready line and its forwarder's socket exists."""
    wait_ready(n.node, timeout)
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not n.socket_path.exists():
        if time.monotonic() > deadline:
            raise TestbedError(f"HTTP forwarder of {n.name} never created {n.socket_path}")
        time.sleep(0.05)  # a file appearing from another process: poll with a deadline


def start_node_group(
    tb: Testbed,
    links: Sequence[Link],
    root: Path,
    started: list[NsNode],
    *,
    bootstrap: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> list[NsNode]:
    """Start one node per link at once (named after the namespace, data under ``root``),
    then wait for each. Appends to ``started`` as each process starts, so the caller stops
    them all even if a later one fails."""
    group = []
    for link in links:
        name = link.ns.name.rsplit("-", 1)[1]
        n = start_ns_node(
            tb, link, name, root / name, bootstrap=bootstrap, extra=extra, env=env, wait=False
        )
        started.append(n)
        group.append(n)
    for n in group:
        wait_node(n, ready_timeout)
    return group
