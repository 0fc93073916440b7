"""Is a listen address free? Checked before a node listens, so a taken port is one clear error.

py-libp2p opens its TCP listeners with SO_REUSEPORT (for hole punching), and on Linux two
sockets that both set it may listen on one port at once: a second node would silently share
the first one's libp2p port, and each connection would reach one of them at random. A probe
socket *without* SO_REUSEPORT cannot bind a port another socket listens on, so binding one
for a moment tells us whether the port is free. SO_REUSEADDR stays on, as on the real
listeners: a port whose old connections linger in TIME_WAIT (a node just restarted) is free.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from p2pcache.errors import StartupError


@dataclass(frozen=True)
class TcpEndpoint:
    """One TCP address a listener binds."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def tcp_endpoints(multiaddrs: Iterable[str]) -> list[tuple[str, TcpEndpoint]]:
    """``(multiaddr, endpoint)`` for each ``/ip4|ip6/<host>/tcp/<port>`` listen address with a
    fixed port; port 0 (any free port) and other transports have nothing to check."""
    out = []
    for addr in multiaddrs:
        parts = addr.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp":
            if parts[3].isdigit() and int(parts[3]) != 0:
                out.append((addr, TcpEndpoint(parts[1], int(parts[3]))))
    return out


def bind_error(endpoint: TcpEndpoint) -> OSError | None:
    """The error binding ``endpoint`` gives (None: free). The probe socket closes at once."""
    with socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            return exc
    return None


def describe_bind_error(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "is in use (another node or program listens there)"
    if exc.errno == errno.EACCES:
        return "needs privileges (ports below 1024 are reserved for root)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "is not an address of this machine"
    return f"cannot be bound ({exc.strerror or exc})"


def check_listen_addrs(multiaddrs: Iterable[str]) -> None:
    """StartupError naming the first libp2p listen address that cannot be bound."""
    for addr, endpoint in tcp_endpoints(multiaddrs):
        if (exc := bind_error(endpoint)) is not None:
            raise StartupError(
                f"libp2p listen address {addr} {describe_bind_error(exc)}; stop the other "
                f"node, or pass --listen with another port (e.g. /ip4/0.0.0.0/tcp/4002)"
            )
