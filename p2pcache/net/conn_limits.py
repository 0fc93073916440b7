"""Inbound connection limits and a connection manager, on top of py-libp2p's swarm.

py-libp2p 0.8.1 accepts every TCP connection in ``Swarm._handle_inbound_connection``: it takes
one of ``max_connections - min_connections`` inbound slots, upgrades (Noise + yamux, bounded by
``ConnectionConfig.inbound_upgrade_timeout``, 10 s by default) and then holds the slot until the
*swarm* stops (it awaits the swarm's end, not the connection's). So a few hundred idle sockets
from one address fill every slot for 10 s each, and every slot an honest connection ever took
stays taken. It has no per-IP limit (its resource manager's CIDR limits count whole subnets).

`InboundGuard` takes that handler's place on the swarm (an instance attribute; the listener
looks the handler up on each connection): it refuses a connection at once when its IP already
has ``max_per_ip`` inbound connections (in handshake or established) or ``max_pending``
handshakes are in progress, runs py-libp2p's own gate and upgrade (``upgrade_inbound_raw_conn``
with a short ``inbound_upgrade_timeout``), and frees the connection's slot when the connection
ends. `ConnTrimmer` closes the lowest-scored peers when there are more than ``high_water``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

from p2pcache.net.config import ConnLimits

log = logging.getLogger(__name__)


def connection_config(limits: ConnLimits) -> ConnectionConfig:
    """py-libp2p's own limits, set from ours: the hard cap, the handshake deadline, and its
    pruner only at the hard cap (`ConnTrimmer` trims by our scores below it)."""
    return ConnectionConfig(
        max_connections=limits.max_connections,
        high_watermark=limits.max_connections,
        low_watermark=min(100, limits.max_connections),
        min_connections=min(50, limits.max_connections),
        inbound_upgrade_timeout=limits.handshake_timeout_s,
    )


@dataclass
class InboundStats:
    accepted: int = 0  # upgraded and added to the swarm
    refused_per_ip: int = 0
    refused_pending: int = 0
    refused_full: int = 0
    failed_handshake: int = 0  # timed out, or not Noise + yamux


@dataclass
class InboundGuard:
    """Per-IP and pending-handshake admission for one swarm's inbound connections."""

    swarm: Swarm
    limits: ConnLimits
    stats: InboundStats = field(default_factory=InboundStats)
    per_ip: dict[str, int] = field(default_factory=dict)  # inbound connections by remote IP
    pending: int = 0  # inbound connections still in their handshake

    def install(self) -> None:
        # The listener calls ``swarm._handle_inbound_connection`` for each connection: ours
        # replaces it for this swarm only.
        self.swarm._handle_inbound_connection = self.handle  # type: ignore[method-assign]

    def _refusal(self, ip: str) -> str | None:
        if self.per_ip.get(ip, 0) >= self.limits.max_per_ip:
            self.stats.refused_per_ip += 1
            return "per-ip"
        if self.pending >= self.limits.max_pending:
            self.stats.refused_pending += 1
            return "pending"
        if len(self.swarm.get_connections()) >= self.limits.max_connections:
            self.stats.refused_full += 1
            return "full"
        return None

    async def handle(self, rwc: Any, maddr: Any) -> None:
        """Admit, upgrade and hold one inbound connection until it ends; never raises."""
        addr = rwc.get_remote_address() if hasattr(rwc, "get_remote_address") else None
        ip = str(addr[0]) if addr else "?"
        why = self._refusal(ip)
        if why is not None:
            log.debug("inbound connection from %s refused (%s)", ip, why)
            await _close(rwc)
            return
        # Counted before the first checkpoint: concurrent handlers see each other.
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.pending += 1
        in_handshake = True
        try:
            remote = self.swarm._build_remote_multiaddr(rwc)
            if remote is not None and not await self.swarm.connection_gate.is_allowed(remote):
                await _close(rwc)
                return
            raw = RawConnection(rwc, False)
            try:
                muxed = await self.swarm.upgrade_inbound_raw_conn(raw, maddr)
            except Exception as exc:  # timeout, wrong protocols, cap reached: closed by it
                self.stats.failed_handshake += 1
                log.debug("inbound handshake from %s failed: %s", ip, exc)
                await _close(raw)
                return
            self.pending -= 1
            in_handshake = False
            self.stats.accepted += 1
            await _wait_closed(muxed)
        finally:
            if in_handshake:
                self.pending -= 1
            n = self.per_ip.get(ip, 1) - 1
            if n > 0:
                self.per_ip[ip] = n
            else:
                self.per_ip.pop(ip, None)

    def snapshot(self) -> dict[str, Any]:
        return {**vars(self.stats), "pending": self.pending, "ips": len(self.per_ip)}


async def _close(conn: Any) -> None:
    with trio.move_on_after(1):
        try:
            await conn.close()
        except Exception:
            pass


async def _wait_closed(muxed: Any) -> None:
    """Until the multiplexed connection shuts down (yamux sets ``event_shutting_down`` when
    either side closes it or its socket fails)."""
    event = getattr(muxed, "event_shutting_down", None)
    if event is None:  # not yamux: hold the slot while the swarm still lists it
        while not getattr(muxed, "is_closed", True):  # noqa: ASYNC110 - no close event here
            await trio.sleep(1)
        return
    await event.wait()


@dataclass
class ConnTrimmer:
    """Above ``high_water`` connected peers, closes the lowest-scored ones (banned peers score
    lowest) down to ``low_water``. A peer connected less than ``grace_s`` ago, and those in
    ``protected()`` (e.g. the GossipSub mesh), are kept."""

    limits: ConnLimits
    score: Callable[[str], float]
    protected: Callable[[], Collection[str]] = lambda: ()
    trimmed: int = 0
    _first_seen: dict[str, float] = field(default_factory=dict)

    def victims(self, connected: Collection[str], now: float) -> list[str]:
        """Which peers to close now (lowest score first), so that ``low_water`` remain."""
        for p in connected:
            self._first_seen.setdefault(p, now)
        for p in [p for p in self._first_seen if p not in connected]:
            del self._first_seen[p]
        if len(connected) <= self.limits.high_water:
            return []
        keep = set(self.protected())
        candidates = [
            p
            for p in connected
            if p not in keep and now - self._first_seen[p] >= self.limits.grace_s
        ]
        candidates.sort(key=lambda p: (self.score(p), p))
        return candidates[: len(connected) - self.limits.low_water]

    async def run(self, host: IHost) -> None:
        """Until cancelled: look every ``trim_every_s`` and close the victims."""
        while True:
            connected = {p.to_base58() for p in host.get_connected_peers()}
            for p in self.victims(connected, time.monotonic()):
                self.trimmed += 1
                log.info("trimming connection to %s (score %.2f)", p[:16], self.score(p))
                with trio.move_on_after(5):
                    try:
                        await host.disconnect(ID.from_base58(p))
                    except Exception as exc:
                        log.info("could not close %s: %r", p[:16], exc)
            await trio.sleep(self.limits.trim_every_s)


def guard_host(host: IHost, limits: ConnLimits) -> InboundGuard:
    """Install the inbound limits on a host built with `connection_config` (before it
    listens)."""
    swarm = host.get_network()
    if not isinstance(swarm, Swarm):
        raise TypeError(f"inbound limits need py-libp2p's Swarm, not {type(swarm).__name__}")
    guard = InboundGuard(swarm, limits)
    guard.install()
    return guard


def guard_of(host: IHost) -> InboundGuard | None:
    """The `InboundGuard` installed on ``host`` by `guard_host`, if any."""
    handler = getattr(host.get_network(), "_handle_inbound_connection", None)
    guard = getattr(handler, "__self__", None)
    return guard if isinstance(guard, InboundGuard) else None
