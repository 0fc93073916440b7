"""Build topologies of Linux network namespaces: bridges, veth links, shaped links, commands.

A ``Testbed`` owns everything it creates and deletes it on ``close()`` (or leaving the
``with`` block), also when a step fails half-way; ``cleanup_prefix`` removes leftovers of a
crashed run. Layout: every bridge lives in one *switch* namespace (``<prefix>-sw``), so the
host's own network namespace is never touched; a node namespace gets a veth whose other end
is a port of a bridge. Addresses must lie in 10.0.0.0/8 and no link leads to the host, so a
testbed can never route anything outside itself.

Higher-level pieces (NAT routers, node processes) build on the public methods here:
``add_namespace``, ``add_bridge``, ``attach``, ``add_route``, ``sysctl``, ``run``/``popen``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

PRIVATE = IPv4Network("10.0.0.0/8")
_SHAPER = "p2pcache.testbed.shaper"
NETNS_DIR = Path("/var/run/netns")
CMD_TIMEOUT_S = 20.0  # one ip/tc call; they take milliseconds unless the kernel is stuck
STOP_TIMEOUT_S = 15.0


class TestbedError(RuntimeError):
    """A namespace, link or shaping step failed (message says which command and why)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class LinkShape:
    """``tc netem`` parameters for one link, applied to the egress of both of its ends, so
    ``delay_ms`` is the one-way delay across the link in either direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float | None = None
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss_pct <= 100:
            raise ValueError(f"bad link shape {self}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"bad link rate {self.rate_mbit}")

    def netem_args(self) -> list[str]:
        args = ["netem"]
        if self.delay_ms or self.jitter_ms:
            args += ["delay", f"{self.delay_ms}ms"]
            if self.jitter_ms:
                args += [f"{self.jitter_ms}ms"]
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct}%"]
        if self.rate_mbit is not None:
            args += ["rate", f"{self.rate_mbit}mbit"]
        return args


@dataclass(frozen=True)
class Netns:
    """One network namespace; ``argv`` wraps a command to run inside it."""

    name: str

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]


@dataclass
class Bridge:
    """A Linux bridge in the switch namespace serving one private subnet."""

    name: str
    subnet: IPv4Network
    _next_host: int = 1

    def allocate(self) -> IPv4Interface:
        hosts = self.subnet.num_addresses - 2
        if self._next_host > hosts:
            raise TestbedError(f"subnet {self.subnet} of bridge {self.name} is full")
        addr = self.subnet.network_address + self._next_host
        self._next_host += 1
        return IPv4Interface(f"{addr}/{self.subnet.prefixlen}")


@dataclass(frozen=True)
class Link:
    """A veth from ``ns`` (device ``ifname``, address ``address``) to a bridge port
    (device ``port`` in the switch namespace)."""

    ns: Netns
    ifname: str
    address: IPv4Interface
    bridge: Bridge
    port: str

    @property
    def ip(self) -> IPv4Address:
        return self.address.ip


def netns_available() -> str | None:
    """None when namespaces can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=CMD_TIMEOUT_S
    )
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (container kernels often lack sch_netem)."""
    if netns_available() is not None or shutil.which("tc") is None:
        return False
    name = "p2pnetemprobe"
    _run(["ip", "netns", "add", name], check=False)
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        res = _run(
            ["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            check=False,
        )
        return res.returncode == 0
    finally:
        _run(["ip", "netns", "del", name], check=False)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace named ``<prefix>-*`` (leftovers of a crashed run), killing
    the processes still inside; returns the names deleted."""
    _check_prefix(prefix)
    res = _run(["ip", "-j", "netns", "list"], check=False)
    names = [d["name"] for d in json.loads(res.stdout or "[]")] if res.returncode == 0 else []
    gone = []
    for name in names:
        if name.startswith(prefix + "-"):
            _kill_inside(name)
            _run(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


class Testbed:
    """Owns a set of namespaces named ``<prefix>-<short>``; a context manager."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, prefix: str = "p2pt", shaping: str = "auto") -> None:
        """``shaping``: "netem" (tc qdisc), "relay" (`p2pcache.testbed.shaper`, for kernels
        without sch_netem) or "auto" (netem where the kernel has it)."""
        _check_prefix(prefix)
        reason = netns_available()
        if reason is not None:
            raise TestbedError(reason)
        if shaping not in ("auto", "netem", "relay"):
            raise TestbedError(f"shaping must be auto, netem or relay, not {shaping!r}")
        if shaping == "auto":
            shaping = "netem" if netem_available() else "relay"
        self.shaping = shaping
        self._legs: dict[str, str] = {}  # port -> shaper leg spec (relay shaping)
        self._shaper: subprocess.Popen[str] | None = None
        self.prefix = prefix
        self.switch = Netns(f"{prefix}-sw")
        self.namespaces: dict[str, Netns] = {}
        self.bridges: dict[str, Bridge] = {}
        self.links: list[Link] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._ports = 0
        self._switch_made = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop processes started here, then delete every namespace (their veths and
        bridges go with them). Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        if self._shaper is not None:
            _stop(self._shaper)
        for proc in self._procs:
            _stop(proc)
        names = [ns.name for ns in self.namespaces.values()]
        if self._switch_made:
            names.append(self.switch.name)
        for name in names:
            _kill_inside(name)
            _run(["ip", "netns", "del", name], check=False)

    # -- building ----------------------------------------------------------------------

    def add_namespace(self, short: str) -> Netns:
        """A fresh namespace with loopback up (nodes talk to themselves on 127.0.0.1)."""
        if short in self.namespaces or short == "sw":
            raise TestbedError(f"namespace {short!r} exists")
        ns = Netns(f"{self.prefix}-{short}")
        _run(["ip", "netns", "add", ns.name])
        self.namespaces[short] = ns  # owned from here on, so close() deletes it
        _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def add_bridge(self, short: str, subnet: str | IPv4Network) -> Bridge:
        """A bridge (in the switch namespace) for one private subnet inside 10.0.0.0/8."""
        net = _private_net(subnet)
        if short in self.bridges:
            raise TestbedError(f"bridge {short!r} exists")
        for other in self.bridges.values():
            if other.subnet.overlaps(net):
                raise TestbedError(f"subnet {net} overlaps {other.subnet} of {other.name}")
        self._ensure_switch()
        bridge = Bridge(name=f"br-{short}"[:15], subnet=net)
        _run(["ip", "-n", self.switch.name, "link", "add", bridge.name, "type", "bridge"])
        _run(["ip", "-n", self.switch.name, "link", "set", bridge.name, "up"])
        self.bridges[short] = bridge
        return bridge

    def attach(
        self,
        ns: Netns,
        bridge: Bridge,
        *,
        address: str | IPv4Interface | None = None,
        ifname: str = "eth0",
        shape: LinkShape | None = None,
    ) -> Link:
        """Link ``ns`` to ``bridge`` by a veth named ``ifname`` inside ``ns``, with
        ``address`` (default: the bridge subnet's next free host address)."""
        iface = IPv4Interface(address) if address is not None else bridge.allocate()
        if iface.ip not in bridge.subnet:
            raise TestbedError(f"{iface} is not in {bridge.subnet} of {bridge.name}")
        self._ports += 1
        port = f"p{self._ports}"
        sw = self.switch.name
        _run(
            ["ip", "-n", sw, "link", "add", port, "type", "veth"]
            + ["peer", "name", ifname, "netns", ns.name]
        )
        _run(["ip", "-n", sw, "link", "set", port, "master", bridge.name])
        _run(["ip", "-n", sw, "link", "set", port, "up"])
        _run(["ip", "-n", ns.name, "addr", "add", str(iface), "dev", ifname])
        _run(["ip", "-n", ns.name, "link", "set", ifname, "up"])
        if self.shaping == "relay":  # frames must leave whole to cross a userspace shaper
            self.run(ns, [sys.executable, "-m", _SHAPER, "--offload-off", ifname])
        link = Link(ns=ns, ifname=ifname, address=iface, bridge=bridge, port=port)
        self.links.append(link)
        if shape is not None:
            self.shape(link, shape)
        return link

    def host(
        self, short: str, bridge: Bridge, *, shape: LinkShape | None = None
    ) -> tuple[Netns, Link]:
        """A namespace with one link to ``bridge`` (the common case)."""
        ns = self.add_namespace(short)
        return ns, self.attach(ns, bridge, shape=shape)

    def add_route(self, ns: Netns, dest: str | IPv4Network, via: str | IPv4Address) -> None:
        """Route ``dest`` (inside 10.0.0.0/8, or "default") from ``ns`` through ``via``."""
        gateway = IPv4Address(via)
        if gateway not in PRIVATE:
            raise TestbedError(f"gateway {gateway} is outside {PRIVATE}")
        target = "default" if dest == "default" else str(_private_net(dest))
        _run(["ip", "-n", ns.name, "route", "replace", target, "via", str(gateway)])

    def enable_multicast(self, link: Link) -> None:
        """Route link-local multicast (224.0.0.0/4: mDNS) out of ``link``: a namespace
        without a default route has none, and multicast sends would fail."""
        _run(["ip", "-n", link.ns.name, "route", "replace", "224.0.0.0/4", "dev", link.ifname])

    def sysctl(self, ns: Netns, key: str, value: str) -> None:
        """Set a per-namespace sysctl, e.g. ``net.ipv4.ip_forward`` for a router."""
        _run(["ip", "netns", "exec", ns.name, "sysctl", "-q", "-w", f"{key}={value}"])

    def shape(self, link: Link, shape: LinkShape) -> None:
        """Apply ``shape`` to both directions of ``link`` (replacing an earlier shape)."""
        if self.shaping == "relay":
            self._shape_relay(link, shape)
            return
        for ns_name, dev in ((link.ns.name, link.ifname), (self.switch.name, link.port)):
            res = _run(
                ["tc", "-n", ns_name, "qdisc", "replace", "dev", dev, "root", *shape.netem_args()],
                check=False,
            )
            if res.returncode != 0:
                raise TestbedError(
                    f"tc netem on {ns_name}/{dev} failed: {res.stderr.strip()}"
                    + ("" if netem_available() else " (this kernel has no sch_netem)")
                )

    # -- running -----------------------------------------------------------------------

    def run(
        self, ns: Netns, cmd: Sequence[str], *, timeout: float = CMD_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside ``ns`` to completion (bounded by ``timeout``)."""
        return _run(ns.argv(cmd), check=check, timeout=timeout)

    def popen(self, ns: Netns, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``ns``; the testbed stops it on close if still running.
        (``ip netns exec`` execs the command, so the Popen's pid is the command's.)"""
        proc: subprocess.Popen[Any] = subprocess.Popen(ns.argv(cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def counters(self, link: Link) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of ``link``'s interface inside its namespace."""
        res = _run(["ip", "-n", link.ns.name, "-s", "-j", "link", "show", "dev", link.ifname])
        stats = json.loads(res.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def iter_links(self, ns: Netns) -> Iterator[Link]:
        return (link for link in self.links if link.ns == ns)

    # -- internals ---------------------------------------------------------------------

    def _shape_relay(self, link: Link, shape: LinkShape) -> None:
        """Splice the userspace shaper into ``link`` (once), then restart it with every
        shaped link's parameters (frames in flight at that moment are lost, as on a
        re-plugged cable)."""
        sw, n = self.switch.name, link.port[1:]
        q, r = f"q{n}", f"r{n}"
        if link.port not in self._legs:
            _run(["ip", "-n", sw, "link", "set", link.port, "nomaster"])
            _run(["ip", "-n", sw, "link", "add", q, "type", "veth", "peer", "name", r])
            _run(["ip", "-n", sw, "link", "set", r, "master", link.bridge.name])
            for dev in (q, r):
                _run(["ip", "-n", sw, "link", "set", dev, "up"])
            self.run(self.switch, [sys.executable, "-m", _SHAPER, "--offload-off", link.port, q, r])
        rate = shape.rate_mbit or 0.0
        spec = f"{link.port}:{q}:{shape.delay_ms}:{shape.jitter_ms}:{rate}:{shape.loss_pct}"
        self._legs[link.port] = spec
        if self._shaper is not None:
            _stop(self._shaper)
        proc = self.popen(
            self.switch,
            [sys.executable, "-m", _SHAPER, *self._legs.values()],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._shaper = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + CMD_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline().strip()  # the shaper prints "ready" at once
            if line == "ready":
                return
        raise TestbedError(f"link shaper did not start (exit {proc.poll()}, said {line!r})")

    def _ensure_switch(self) -> None:
        if self._switch_made:
            return
        _run(["ip", "netns", "add", self.switch.name])
        self._switch_made = True
        _run(["ip", "-n", self.switch.name, "link", "set", "lo", "up"])


def _check_prefix(prefix: str) -> None:
    # Short, plain prefixes only: they end up in namespace names and prefix-based cleanup.
    if not (prefix.isascii() and prefix.isalnum() and 2 <= len(prefix) <= 12):
        raise TestbedError(f"bad testbed prefix {prefix!r} (2-12 letters/digits)")


def _private_net(subnet: str | IPv4Network) -> IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise TestbedError(f"bad subnet {subnet!r}: {exc}") from None
    if not isinstance(net, IPv4Network) or not net.subnet_of(PRIVATE):
        raise TestbedError(f"subnet {net} is outside {PRIVATE}; testbeds stay private")
    return net


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{' '.join(argv)} timed out after {timeout:.0f} s") from None
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res


def _kill_inside(name: str) -> None:
    """SIGKILL processes left inside a namespace, so deleting it frees it at once."""
    res = _run(["ip", "netns", "pids", name], check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            continue


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


__all__ = [
    "Bridge",
    "Link",
    "LinkShape",
    "Netns",
    "Testbed",
    "TestbedError",
    "cleanup_prefix",
    "netem_available",
    "netns_available",
]
