"""NAT routers for testbeds: a router namespace with iptables MASQUERADE between a public
bridge (the "internet" of the testbed) and a private LAN bridge behind it.

The router behaves like a home router: hosts on the LAN reach the public side (their source
address rewritten to the router's public address), replies come back, and nothing from the
public side reaches the LAN unless it belongs to a connection the LAN opened (conntrack
ESTABLISHED/RELATED). Public hosts have no route to the LAN subnet at all, so a dial to a
private address fails at once (no route), as it does on the internet.

Built only from `Testbed`'s public methods; iptables runs inside the router namespace (the
host's tables are never touched). `iptables` (nft backend) is tried first, `iptables-legacy`
if that cannot work inside a namespace here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from ipaddress import IPv4Address

from p2pcache.testbed.netns import Bridge, Link, Netns, Testbed, TestbedError

IPTABLES = ("iptables", "iptables-legacy")


@dataclass(frozen=True)
class NatRouter:
    """A router namespace: ``wan`` on the public bridge, ``lan`` (the LAN's gateway)."""

    ns: Netns
    wan: Link
    lan: Link
    lan_bridge: Bridge
    iptables: str
    stealth: bool

    @property
    def public_ip(self) -> IPv4Address:
        return self.wan.ip

    @property
    def gateway(self) -> IPv4Address:
        return self.lan.ip


def pick_iptables(tb: Testbed, ns: Netns) -> str:
    """The first iptables that can list the nat table inside ``ns``."""
    errors = []
    for cmd in IPTABLES:
        if shutil.which(cmd) is None:
            errors.append(f"{cmd}: not installed")
            continue
        res = tb.run(ns, [cmd, "-t", "nat", "-L", "-n"], check=False)
        if res.returncode == 0:
            return cmd
        errors.append(f"{cmd}: {res.stderr.strip()[:200]}")
    raise TestbedError("no iptables works inside a namespace here: " + "; ".join(errors))


def add_nat_router(
    tb: Testbed, short: str, public: Bridge, lan_subnet: str, *, stealth: bool = True
) -> NatRouter:
    """A router ``short`` on ``public`` with a new LAN ``lan_subnet`` behind MASQUERADE.

    ``stealth``: unsolicited connections to the router itself are dropped silently, as most
    home routers do; without it the router's own stack answers a SYN to a port with no
    mapping with a RST, which kills a TCP hole punch whose SYN arrives before the peer's
    outgoing SYN made the mapping (see docs/run-a-public-node.md)."""
    ns = tb.add_namespace(short)
    wan = tb.attach(ns, public, ifname="wan0")
    lan_bridge = tb.add_bridge(f"{short}lan", lan_subnet)
    lan = tb.attach(ns, lan_bridge, ifname="lan0")
    tb.sysctl(ns, "net.ipv4.ip_forward", "1")
    ipt = pick_iptables(tb, ns)
    rules = [
        ["-t", "nat", "-A", "POSTROUTING", "-s", str(lan_bridge.subnet), "-o", "wan0"]
        + ["-j", "MASQUERADE"],
        ["-P", "FORWARD", "DROP"],
        ["-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", "wan0", "-o", "lan0", "-m", "conntrack"]
        + ["--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
    ]
    if stealth:
        rules.append(
            ["-A", "INPUT", "-i", "wan0", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]
        )
    for rule in rules:
        tb.run(ns, [ipt, *rule])
    return NatRouter(ns=ns, wan=wan, lan=lan, lan_bridge=lan_bridge, iptables=ipt, stealth=stealth)


def add_private_host(tb: Testbed, router: NatRouter, short: str) -> tuple[Netns, Link]:
    """A namespace on ``router``'s LAN whose default route is the router."""
    ns, link = tb.host(short, router.lan_bridge)
    tb.add_route(ns, "default", router.gateway)
    return ns, link


def nat_table(tb: Testbed, router: NatRouter) -> str:
    """The router's conntrack-visible NAT rules with packet counters (for diagnostics)."""
    res = tb.run(router.ns, [router.iptables, "-t", "nat", "-L", "-n", "-v"], check=False)
    return res.stdout


__all__ = ["NatRouter", "add_nat_router", "add_private_host", "nat_table", "pick_iptables"]
