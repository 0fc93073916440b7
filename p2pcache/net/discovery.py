"""Finding the peers that serve this node's model, from one bootstrap address (or mDNS).

Mechanism: libp2p rendezvous (py-libp2p's `RendezvousService`/`RendezvousClient`). Every
node serves rendezvous, narrowed to our own namespaces (``otd/1/...``) and bounded; a node
registers under ``otd/1/providers/<model hash>`` at its *points* (its bootstrap peers and any
mDNS-found peer) and asks them for the others registered there, then dials some of them so
the GossipSub mesh is not a star around the bootstrap node. GossipSub peer exchange (PX, in
gossip.py) spreads peers further on prunes. py-libp2p's Kad-DHT is not used: its protocol
id is a module constant (/ipfs/kad/1.0.0, ``protocol_prefix`` is stored but never read), so
our provider records could only be kept apart from the IPFS DHT by patching module globals
(see docs/run-a-public-node.md, "Discovery").

State bounds: at most ``max_known`` discovered peers; a peer is forgotten once no point has
listed it for ``forget_s`` and it is not connected; the rendezvous server keeps only
registrations of peers still connected to it, in at most ``max_namespaces`` namespaces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.discovery.rendezvous import RendezvousClient, RendezvousService
from libp2p.discovery.rendezvous.messages import (
    create_discover_response_message,
    create_register_message,
    create_register_response_message,
)
from libp2p.discovery.rendezvous.pb.rendezvous_pb2 import Message
from libp2p.discovery.rendezvous.service import RegistrationRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from p2pcache.net.config import DiscoveryConfig
from p2pcache.net.peers import PeerConnections

log = logging.getLogger(__name__)

NAMESPACE_PREFIX = "otd/1/"
STREAM_TIMEOUT_S = 10.0  # one rendezvous request + answer on a server


def providers_namespace(model_hash: str) -> str:
    """The rendezvous namespace of the peers serving one model."""
    return f"{NAMESPACE_PREFIX}providers/{model_hash}"


class BoundedRendezvousService(RendezvousService):
    """py-libp2p's rendezvous server limited to our namespaces, a bounded number of them, and
    to peers still connected (a peer that left is forgotten at once, not after its TTL)."""

    def __init__(self, host: IHost, max_namespaces: int) -> None:
        super().__init__(host)
        self._max_namespaces = max_namespaces

    async def _handle_stream(self, stream: INetStream) -> None:
        """One request per stream, under a deadline. (The library's handler waits for a next
        message without end and logs the client's ordinary close as an error.)"""
        peer_id = stream.muxed_conn.peer_id
        try:
            with trio.move_on_after(STREAM_TIMEOUT_S):
                req = Message()
                req.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 64 * 1024))
                resp: Message | None = None
                if req.type == Message.REGISTER:
                    resp = self._handle_register(peer_id, req.register)
                elif req.type == Message.DISCOVER:
                    resp = self._handle_discover(peer_id, req.discover)
                elif req.type == Message.UNREGISTER:
                    self._handle_unregister(peer_id, req.unregister)
                if resp is not None:
                    await stream.write(encode_varint_prefixed(resp.SerializeToString()))
        except Exception as exc:  # a malformed or abandoned request: this stream only
            log.debug("rendezvous stream from %s failed: %r", peer_id, exc)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.close()

    def register_self(self, namespace: str, addrs: Sequence[str], ttl: int) -> None:
        """List this node in ``namespace``: a point serving a model is a provider of it."""
        me = self.host.get_id()
        raw = [multiaddr.Multiaddr(a.split("/p2p/")[0]).to_bytes() for a in addrs]
        self.registrations.setdefault(namespace, {})[me] = RegistrationRecord(
            me, raw, namespace, ttl
        )

    def _admissible(self, namespace: str) -> bool:
        return namespace.startswith(NAMESPACE_PREFIX) and (
            namespace in self.registrations or len(self.registrations) < self._max_namespaces
        )

    def _handle_register(self, peer_id: ID, register_msg: Message.Register) -> Message:
        if not self._admissible(register_msg.ns):
            return create_register_response_message(
                Message.ResponseStatus.E_INVALID_NAMESPACE, "namespace not served here"
            )
        return super()._handle_register(peer_id, register_msg)

    def _handle_discover(self, peer_id: ID, discover_msg: Message.Discover) -> Message:
        ns = discover_msg.ns
        if ns not in self.registrations:  # never create namespaces on a lookup
            return create_discover_response_message([], b"", Message.ResponseStatus.OK, "OK")
        connected = set(self.host.get_connected_peers()) | {self.host.get_id()}
        regs = self.registrations[ns]
        for pid in [p for p in regs if p not in connected]:
            del regs[pid]
        return super()._handle_discover(peer_id, discover_msg)


class _Client(RendezvousClient):
    """Registers the node's dialable addresses (a 0.0.0.0 listener announced as its real
    addresses), not ``host.get_addrs()``."""

    async def register_addrs(self, namespace: str, addrs: Sequence[str], ttl: int) -> None:
        mas = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs]
        msg = create_register_message(namespace, self.host.get_id(), mas, ttl)
        resp = await self._send_message(msg)
        if resp is None or resp.registerResponse.status != Message.ResponseStatus.OK:
            text = resp.registerResponse.statusText if resp is not None else "no response"
            raise RuntimeError(f"rendezvous register refused: {text}")


@dataclass
class KnownPeer:
    peer_id: str
    addrs: list[str]
    source: str  # "rendezvous" or "mdns"
    first_seen: float
    last_seen: float


@dataclass
class Lookup:
    at: float = 0.0
    took_ms: float = 0.0
    points: int = 0
    found: int = 0
    errors: list[str] = field(default_factory=list)


class Discovery:
    """Registers at and queries rendezvous points, remembers providers, dials some of them."""

    def __init__(
        self,
        connections: PeerConnections,
        model_hash: str,
        config: DiscoveryConfig,
        bootstrap: Sequence[str],
        listen_port: int | None = None,
    ) -> None:
        self.connections = connections
        self.model_hash = model_hash
        self.namespace = providers_namespace(model_hash)
        self.config = config
        self._bootstrap = list(bootstrap)
        self._listen_port = listen_port
        self.known: dict[str, KnownPeer] = {}
        self.last = Lookup()
        self.rounds = 0
        self.started_at = 0.0
        self.first_provider_at: float | None = None
        self._server: BoundedRendezvousService | None = None
        self._mdns: Any = None

    # -- the view ---------------------------------------------------------------------------
    def providers(self) -> list[str]:
        return sorted(self.known)

    def state(self) -> dict[str, Any]:
        """What /admin/status shows under "discovery"."""
        running = self.connections.running
        host = self.connections.host if running else None
        server = self._server
        return {
            "enabled": self.config.enabled,
            "mechanism": "rendezvous",
            "namespace": self.namespace,
            "mdns": self.config.mdns,
            "points": self._points() if running else [],
            "known_peers": len(self.known),
            "providers": [
                {"peer_id": k.peer_id, "addrs": k.addrs[:4], "source": k.source}
                for k in list(self.known.values())[:64]
            ],
            "connected": len(host.get_connected_peers()) if host is not None else 0,
            "peerstore": len(host.get_peerstore().peer_ids()) if host is not None else 0,
            "served_namespaces": len(server.registrations) if server is not None else 0,
            "dht": None,  # not used: see the module docstring
            "rounds": self.rounds,
            "started_at": self.started_at,
            "first_provider_at": self.first_provider_at,
            "last_lookup": {
                "at": self.last.at,
                "took_ms": round(self.last.took_ms, 1),
                "points": self.last.points,
                "found": self.last.found,
                "errors": self.last.errors[-4:],
            },
        }

    # -- running ----------------------------------------------------------------------------
    async def run(
        self, host: IHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        self.started_at = time.time()
        if not cfg.enabled:
            task_status.started()
            return
        if cfg.serve:
            self._server = BoundedRendezvousService(host, cfg.max_namespaces)
        try:
            if cfg.mdns:
                self._start_mdns(host)
            task_status.started()
            await self._loop(host)
        finally:
            if self._mdns is not None:
                self._mdns.stop()  # zeroconf threads: stop them with us
                self._mdns = None

    async def _loop(self, host: IHost) -> None:
        cfg = self.config
        while True:
            await self.round(host)
            # Fast rounds until some provider is known (join time), then the steady pace.
            pause = cfg.first_interval_s if not self.known else cfg.interval_s
            await trio.sleep(pause)

    async def round(self, host: IHost) -> None:
        """One register + discover at every point, then forget, then dial."""
        cfg = self.config
        t0 = time.monotonic()
        lookup = Lookup(at=time.time())
        points = self._points()
        lookup.points = len(points)
        seen: set[str] = set()
        me = host.get_id().to_base58()
        addrs = self.connections.addrs()
        if self._server is not None and addrs:
            self._server.register_self(self.namespace, addrs, cfg.ttl_s)
        answers: dict[str, list[PeerInfo]] = {}
        async with trio.open_nursery() as nursery:  # points answer in parallel
            for pid in points[: cfg.max_points]:
                nursery.start_soon(self._ask, host, pid, addrs, answers, lookup)
        now = time.time()
        for found in answers.values():
            for info in found:
                p = info.peer_id.to_base58()
                if p == me:
                    continue
                seen.add(p)
                self._remember(p, [f"{a}/p2p/{p}" for a in info.addrs], "rendezvous", now)
        if self._server is not None:  # peers that joined through us are providers too
            regs = list(self._server.registrations.get(self.namespace, {}).values())
            linked = set(host.get_connected_peers())  # a peer that left is not listed
            for reg in regs[: cfg.max_known]:
                p = reg.peer_id.to_base58()
                if p != me and not reg.is_expired() and reg.peer_id in linked:
                    seen.add(p)
                    addrs_of = [f"{multiaddr.Multiaddr(a)}/p2p/{p}" for a in reg.addrs]
                    self._remember(p, addrs_of, "rendezvous", time.time())
        for pid, rec in list(self._mdns_peers(host).items()):
            seen.add(pid)
            self._remember(pid, rec, "mdns", time.time())
        self._forget(host, seen)
        lookup.found = len(seen)
        lookup.took_ms = (time.monotonic() - t0) * 1000
        self.last = lookup
        self.rounds += 1
        await self._dial_some(host)

    async def _ask(
        self,
        host: IHost,
        pid: str,
        addrs: Sequence[str],
        answers: dict[str, list[PeerInfo]],
        lookup: Lookup,
    ) -> None:
        """Register at and discover from one point, both at once (each is its own stream:
        on a 200 ms round trip, one after the other would cost a second more per round)."""
        cfg = self.config
        client = _Client(host, ID.from_base58(pid))

        async def register() -> None:
            if addrs:
                await client.register_addrs(self.namespace, addrs, cfg.ttl_s)

        async def discover() -> None:
            answers[pid] = (await client.discover(self.namespace, limit=cfg.max_known))[0]

        try:
            with trio.fail_after(cfg.query_timeout_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(register)
                    nursery.start_soon(discover)
        except Exception as exc:  # a point down or refusing (maybe half-answered): go on
            lookup.errors.append(f"{pid[:12]}: {exc!r}"[:200])

    def _points(self) -> list[str]:
        """Peers we register at: the bootstrap peers and those mDNS found."""
        out: list[str] = []
        for a in self._bootstrap:
            if "/p2p/" in a:
                pid = a.rsplit("/p2p/", 1)[1]
                if pid not in out:
                    out.append(pid)
        if self._mdns is not None:
            out += [p for p in self._mdns_ids() if p not in out]
        return out

    def _remember(self, pid: str, addrs: list[str], source: str, now: float) -> None:
        rec = self.known.get(pid)
        if rec is not None:
            rec.addrs, rec.last_seen = addrs[:8], now
            return
        if len(self.known) >= self.config.max_known:
            return  # bounded: a full table takes no newcomer until someone is forgotten
        self.known[pid] = KnownPeer(pid, addrs[:8], source, now, now)
        if self.first_provider_at is None:
            self.first_provider_at = now
            log.info("first provider of the model found after %.2f s", now - self.started_at)

    def _forget(self, host: IHost, seen: set[str]) -> None:
        """Drop peers no point listed for ``forget_s`` and not connected (they left)."""
        now = time.time()
        connected = {p.to_base58() for p in host.get_connected_peers()}
        for pid, rec in list(self.known.items()):
            if pid in connected:
                rec.last_seen = now
            elif pid not in seen and now - rec.last_seen > self.config.forget_s:
                del self.known[pid]

    async def _dial_some(self, host: IHost) -> None:
        """Connect to known providers until ``target_peers`` connections (bounded per round)."""
        cfg = self.config
        connected = {p.to_base58() for p in host.get_connected_peers()}
        want = cfg.target_peers - len(connected)
        candidates = [k for k in self.known.values() if k.peer_id not in connected]
        if want <= 0 or not candidates:
            return
        async with trio.open_nursery() as nursery:
            for rec in candidates[: min(want, cfg.dials_per_round)]:
                nursery.start_soon(self._dial, rec)

    async def _dial(self, rec: KnownPeer) -> None:
        try:
            await self.connections.dial(rec.peer_id, rec.addrs, self.config.query_timeout_s)
        except Exception as exc:  # unreachable now: forgotten later unless listed again
            log.debug("discovery dial %s failed: %r", rec.peer_id[:12], exc)

    # -- mDNS (LAN, off by default) ---------------------------------------------------------
    def _start_mdns(self, host: IHost) -> None:
        from libp2p.discovery.mdns.mdns import MDNSDiscovery

        port = self._listen_port or 4001
        addrs = [a.split("/p2p/")[0] for a in self.connections.addrs()]
        self._mdns = MDNSDiscovery(host.get_network(), port=port, listen_addrs=addrs, host=host)
        self._mdns.start()

    def _mdns_ids(self) -> list[str]:
        if self._mdns is None:
            return []
        services = dict(self._mdns.listener.discovered_services)  # written by zeroconf threads
        return [pid.to_base58() for pid, _ in list(services.values())[: self.config.max_known]]

    def _mdns_peers(self, host: IHost) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for pid in self._mdns_ids():
            try:
                addrs = host.get_peerstore().addrs(ID.from_base58(pid))
            except Exception:  # expired from the peerstore meanwhile
                continue
            out[pid] = [f"{a}/p2p/{pid}" for a in addrs][:8]
        return out
