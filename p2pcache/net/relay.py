"""Circuit relay v2 for nodes behind NAT, and the relay service public nodes offer.

Built on py-libp2p's own parts (`libp2p.relay.circuit_v2`): its `CircuitV2Protocol` answers
HOP (when serving) and STOP (always, so relayed connections can reach us), its resource
manager enforces the limits, and `DCUtRProtocol` upgrades relayed connections to direct ones.
Three things are done here instead, because py-libp2p's versions don't fit:

- reserving (`reserve`): one RESERVE message on a fresh HOP stream with our own deadline, and
  *without* the optional ``peer`` field (py-libp2p's relay would reserve for whatever peer id
  a client names there);
- dialing a ``/p2p-circuit`` address (`dial_relayed`): py-libp2p's swarm skips relayed
  addresses and its `CircuitV2Transport.dial` makes a reservation before every connect;
- the policy (`Relays`): reserve a slot on a public peer when reachability says private,
  advertise ``<relay addr>/p2p-circuit/p2p/<us>``, refresh it, and serve HOP when ``service``
  is ``on`` (or ``auto`` and we are public).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service

from p2pcache.net.config import RelayConfig
from p2pcache.net.reachability import PRIVATE, PUBLIC, Verdict

log = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"


class RelayError(Exception):
    pass


# -- connections ------------------------------------------------------------------------


def is_relayed(conn: INetConn) -> bool:
    """A connection that runs through a relay (py-libp2p tags them with a circuit address)."""
    try:
        return any(CIRCUIT in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def connection_paths(host: IHost, peer_id: str) -> list[str]:
    """``relayed`` / ``direct`` for each open connection to ``peer_id``."""
    conns = host.get_network().get_connections(ID.from_base58(peer_id))
    return ["relayed" if is_relayed(c) else "direct" for c in conns]


def split_circuit(addr: str) -> tuple[str, str]:
    """``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<target>`` -> (relay addr, target id)."""
    relay, sep, rest = addr.partition(CIRCUIT)
    target = rest.removeprefix("/p2p/")
    if not sep or "/p2p/" not in relay or not target or "/" in target:
        raise RelayError(f"not a relayed address: {addr}")
    return relay, target


async def _hop_stream(host: IHost, relay_addr: str, timeout_s: float) -> Any:
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    with trio.fail_after(timeout_s):
        if info.peer_id not in host.get_connected_peers():
            await host.connect(info)
        return await host.new_stream(info.peer_id, [HOP_PROTOCOL])


async def dial_relayed(host: IHost, addr: str, timeout_s: float) -> None:
    """Connect to the target of a ``/p2p-circuit`` address through its relay: HOP CONNECT,
    then Noise + yamux over the relayed stream (the swarm keeps the connection)."""
    relay_addr, target = split_circuit(addr)
    with trio.fail_after(timeout_s):
        stream = await _hop_stream(host, relay_addr, timeout_s)
        try:
            target_id = ID.from_base58(target)
            await write_delimited_msg(
                stream,
                HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=target_id.to_bytes())),
            )
            resp = await read_delimited_msg(stream, HopMessage)
            code = resp.status if resp.HasField("status") else StatusCode.OK
            if code != StatusCode.OK:
                raise RelayError(f"relay refused the circuit: status {code}")
            raw: Any = RawConnection(
                stream=stream,
                initiator=True,
                connection_type=ConnectionType.RELAYED,
                addresses=[multiaddr.Multiaddr(addr)],
            )
            # A private swarm's key protects relayed connections too: the swarm applies it
            # when it dials and when it accepts (the STOP side), but not in this upgrade.
            if (psk := getattr(host.get_network(), "psk", None)) is not None:
                raw = new_protected_conn(raw, psk)
            conn = await host.upgrade_outbound_connection(raw, target_id)
            conn.set_transport_info([multiaddr.Multiaddr(addr)], ConnectionType.RELAYED)
        except BaseException:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.reset()
            raise


# -- reservations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A slot we hold on a relay."""

    relay: str  # peer id
    relay_addr: str  # how we reach it: /ip4/../tcp/../p2p/<relay>
    expires: int  # unix time
    reserved_at: float

    def relayed_addr(self, me: str) -> str:
        return f"{self.relay_addr}{CIRCUIT}/p2p/{me}"


def _relay_addr_of(host: IHost, relay: ID) -> str | None:
    """The relay's address as our connection to it sees it (that one works for us and, if
    the relay is public, for others too)."""
    for c in host.get_network().get_connections(relay):
        for a in c.get_transport_addresses():
            s = str(a).split("/p2p/")[0]
            if CIRCUIT not in s and s.startswith("/ip4/") and "/tcp/" in s:
                return f"{s}/p2p/{relay.to_base58()}"
    return None


def connected_addrs(host: IHost) -> list[str]:
    """The address of each directly connected peer as our connection sees it."""
    out = []
    for pid in host.get_connected_peers():
        if (a := _relay_addr_of(host, pid)) is not None:
            out.append(a)
    return out


async def reserve(host: IHost, relay_addr: str, timeout_s: float) -> Held:
    """Ask the relay at ``relay_addr`` for a slot (or renew ours); RelayError if refused."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    with trio.fail_after(timeout_s):
        stream = await _hop_stream(host, relay_addr, timeout_s)
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            resp = await read_delimited_msg(stream, HopMessage)
        finally:
            with trio.move_on_after(1):
                await stream.close()
    code = resp.status if resp.HasField("status") else StatusCode.OK
    if code != StatusCode.OK or not resp.HasField("reservation"):
        raise RelayError(f"reservation refused: status {code}")
    addr = _relay_addr_of(host, info.peer_id) or relay_addr
    return Held(info.peer_id.to_base58(), addr, int(resp.reservation.expire), time.time())


# -- the node's relay part --------------------------------------------------------------


@dataclass
class RelayStats:
    reservations_made: int = 0
    reservation_failures: int = 0
    slots_lost: int = 0
    events: list[str] = field(default_factory=list)  # the last few decisions, for status


class Relays:
    """Serves HOP when public (per config), holds a relay slot when private, runs DCUtR."""

    def __init__(
        self,
        me: str,
        config: RelayConfig,
        *,
        candidates: Callable[[], Sequence[str]] = lambda: (),
    ) -> None:
        self.me = me
        self.config = config
        self.candidates = candidates  # peers' full addresses to try as relays, best first
        self.stats = RelayStats()
        self.held: dict[str, Held] = {}
        self.reachability = "unknown"
        self.serving = False
        self._protocol: CircuitV2Protocol | None = None
        self._host: IHost | None = None
        self._wake = trio.Event()

    # -- what others read ----------------------------------------------------------------
    def relayed_addrs(self) -> list[str]:
        now = time.time()
        return [h.relayed_addr(self.me) for h in self.held.values() if h.expires > now]

    def snapshot(self) -> dict[str, Any]:
        served: dict[str, Any] = {"on": self.serving, "mode": self.config.service}
        if self._protocol is not None and self.serving:
            rm = self._protocol.resource_manager
            served["reservations"] = len(getattr(rm, "_reservations", {}))
            served["circuits"] = sum(
                r.active_connections for r in getattr(rm, "_reservations", {}).values()
            )
            served["limits"] = {
                "max_reservations": self.config.max_reservations,
                "reservation_s": self.config.reservation_s,
                "max_circuits_per_peer": self.config.max_circuits,
                "max_circuit_bytes": self.config.max_circuit_bytes,
            }
        return {
            "service": served,
            "reservations": [
                {
                    "relay": h.relay,
                    "relay_addr": h.relay_addr,
                    "expires": h.expires,
                    "reserved_at": h.reserved_at,
                }
                for h in self.held.values()
            ],
            "relayed_addrs": self.relayed_addrs(),
            "dcutr": self.config.dcutr,
            "stats": {k: v for k, v in vars(self.stats).items() if k != "events"},
            "events": list(self.stats.events),
        }

    def _event(self, line: str, warn: bool = False) -> None:
        (log.warning if warn else log.info)(line)
        self.stats.events = [*self.stats.events[-9:], f"{time.strftime('%H:%M:%S')} {line}"]

    # -- reacting to reachability ---------------------------------------------------------
    def on_reachability(self, verdict: Verdict) -> None:
        self.reachability = verdict.status
        self._wake.set()

    def _want_service(self) -> bool:
        mode = self.config.service
        return mode == "on" or (mode == "auto" and self.reachability == PUBLIC)

    def _update_service(self) -> None:
        host, want = self._host, self._want_service()
        if host is None or self._protocol is None or want == self.serving:
            return
        if want:
            host.set_stream_handler(HOP_PROTOCOL, self._protocol._handle_hop_stream)
            self._event(
                f"relay service on: up to {self.config.max_reservations} reservations, "
                f"{self.config.max_circuit_bytes} bytes per circuit"
            )
        else:
            host.remove_stream_handler(HOP_PROTOCOL)
            self._event("relay service off")
        self.serving = want

    async def _ensure_slot(self, host: IHost) -> None:
        now = time.time()
        if self.reachability == PUBLIC and self.held:
            self._event("reachability: public; giving up relay slots (peers can dial us)")
            self.held.clear()
        connected = set(host.get_connected_peers())
        for relay, h in list(self.held.items()):
            # The slot lives as long as our connection to the relay (it reaches us through
            # it); renew in time, and look for another relay if the connection is gone.
            gone = ID.from_base58(relay) not in connected
            if gone or h.expires - now < min(300.0, self.config.reservation_s / 2):
                try:
                    self.held[relay] = await reserve(
                        host, h.relay_addr, self.config.reservation_timeout_s
                    )
                except Exception as exc:
                    self.stats.slots_lost += 1
                    self._event(f"relay slot on {relay[:16]} lost: {exc!r}", warn=True)
                    del self.held[relay]
        if self.held or self.reachability != PRIVATE or not self.config.use_relays:
            return
        tried = 0
        seen: set[str] = set()
        for addr in [*self.config.relays, *self.candidates(), *connected_addrs(host)]:
            if CIRCUIT in addr or "/p2p/" not in addr or addr in seen or tried >= 8:
                continue
            seen.add(addr)
            tried += 1
            relay = addr.rsplit("/p2p/", 1)[1]
            self._event(f"reachability: private; reserving a relay slot on {relay[:16]}")
            if await self.reserve_on(host, addr):
                return
        self._event(
            f"reachability: private and no relay slot ({tried} peers tried); "
            "other nodes cannot dial us",
            warn=True,
        )

    async def reserve_on(self, host: IHost, addr: str) -> bool:
        """Reserve a slot on the relay at ``addr`` (full multiaddr); False if refused."""
        relay = addr.rsplit("/p2p/", 1)[-1]
        try:
            h = await reserve(host, addr, self.config.reservation_timeout_s)
        except Exception as exc:
            self.stats.reservation_failures += 1
            log.info("relay %s refused or failed: %r", relay[:16], exc)
            return False
        self.held[h.relay] = h
        self.stats.reservations_made += 1
        self._event(f"relay slot on {relay[:16]} until {h.expires}: {h.relayed_addr(self.me)}")
        return True

    async def run(
        self, host: IHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        limits = RelayLimits(
            duration=cfg.reservation_s,
            data=cfg.max_circuit_bytes,
            max_circuit_conns=cfg.max_circuits,
            max_reservations=cfg.max_reservations,
            reservation_ttl=cfg.reservation_s,
        )
        protocol = CircuitV2Protocol(host, limits=limits, allow_hop=False)  # STOP: always
        self._host = host
        try:
            async with background_trio_service(protocol):
                self._protocol = protocol
                self._update_service()
                if cfg.dcutr:
                    async with background_trio_service(DCUtRProtocol(host)):
                        task_status.started()
                        await self._loop(host)
                else:
                    task_status.started()
                    await self._loop(host)
        finally:
            self._protocol = None
            self._host = None
            self.held.clear()

    async def _loop(self, host: IHost) -> None:
        while True:
            self._update_service()
            await self._ensure_slot(host)
            retry = 30.0 if self.reachability == PRIVATE and not self.held else 60.0
            with trio.move_on_after(retry):
                await self._wake.wait()
            self._wake = trio.Event()
