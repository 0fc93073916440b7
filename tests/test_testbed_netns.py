"""The network-namespace testbed itself (`p2pcache.testbed`): links carry TCP between
namespaces, shaped links add their delay, addresses stay private, and everything the testbed
made is gone after it closes (also after a failure), or after a prefix cleanup.

Needs root and ``ip netns`` (skipped otherwise); no model, no nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from p2pcache.testbed import LinkShape, Testbed, TestbedError, cleanup_prefix, netns_available

_why = netns_available()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"netns testbed unavailable: {_why}")

PREFIX = "p2ptb"
PORT = 9000
# A one-shot TCP server: answers each connection with the byte count it received.
SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {PORT})); s.listen(); print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); n = 0\n"
    "    while (b := c.recv(65536)): n += len(b)\n"
    "    c.sendall(str(n).encode()); c.close()\n"
)


def client(ip: str, nbytes: int) -> str:
    """A client measuring its TCP connect time (ms) and sending ``nbytes``."""
    return (
        "import socket, time\n"
        f"t = time.monotonic(); s = socket.create_connection(('{ip}', {PORT}), timeout=10)\n"
        "ms = (time.monotonic() - t) * 1000\n"
        f"s.sendall(b'x' * {nbytes}); s.shutdown(socket.SHUT_WR)\n"
        "print(round(ms, 1), s.recv(64).decode())\n"
    )


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return {d["name"] for d in json.loads(out or "[]")}


def serve(tb: Testbed, ns_short: str) -> subprocess.Popen[str]:
    proc = tb.popen(
        tb.namespaces[ns_short], [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def test_links_carry_tcp_and_close_removes_everything() -> None:
    cleanup_prefix(PREFIX)
    with Testbed(PREFIX) as tb:
        lan = tb.add_bridge("lan", "10.80.0.0/24")
        a, _ = tb.host("a", lan)
        b, lb = tb.host("b", lan)
        server = serve(tb, "b")
        out = tb.run(a, [sys.executable, "-c", client(str(lb.ip), 1_000_000)], timeout=30)
        assert out.stdout.split()[1] == "1000000"
        rx, tx = tb.counters(lb)
        assert rx >= 1_000_000 and tx > 0
        assert {f"{PREFIX}-a", f"{PREFIX}-b", f"{PREFIX}-sw"} <= namespaces()
    assert server.poll() is not None  # the testbed stopped what it started
    assert not {n for n in namespaces() if n.startswith(PREFIX + "-")}


def test_a_shaped_link_delays_both_directions() -> None:
    with Testbed(PREFIX) as tb:
        lan = tb.add_bridge("lan", "10.80.0.0/24")
        a, _ = tb.host("a", lan, shape=LinkShape(delay_ms=40))
        _, lb = tb.host("b", lan)
        serve(tb, "b")
        out = tb.run(a, [sys.executable, "-c", client(str(lb.ip), 300_000)], timeout=30)
        connect_ms, got = out.stdout.split()
        # A TCP connect is one round trip: 40 ms out and 40 ms back through the shaped link.
        assert float(connect_ms) >= 80 and got == "300000"


def test_addresses_outside_10_8_are_refused_and_failure_still_cleans_up() -> None:
    with pytest.raises(TestbedError, match="outside"):
        with Testbed(PREFIX) as tb:
            tb.add_namespace("a")
            tb.add_bridge("lan", "192.168.5.0/24")
    with pytest.raises(TestbedError, match="outside"):
        with Testbed(PREFIX) as tb:
            ns = tb.add_namespace("a")
            tb.add_route(ns, "default", "172.16.0.1")
    assert not {n for n in namespaces() if n.startswith(PREFIX + "-")}


def test_cleanup_prefix_removes_leftovers_of_a_crashed_run() -> None:
    tb = Testbed(PREFIX)
    tb.add_namespace("left")
    leftover = tb.popen(tb.namespaces["left"], ["sleep", "60"])
    # No close(): as if the run had crashed.
    assert cleanup_prefix(PREFIX) == [f"{PREFIX}-left"]
    deadline = time.monotonic() + 10
    while leftover.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the kill is asynchronous: poll with a deadline
    assert leftover.poll() is not None
    assert f"{PREFIX}-left" not in namespaces()
