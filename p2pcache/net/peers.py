"""Connections to peers: the running host, dialing (bootstrap, warm producers, fetches) and
disconnecting banned peers.

`PeerConnections.run` owns the host's use: it is given the started host, dials the bootstrap
peers, keeps producers warm and trims connections above the high-water mark (`ConnTrimmer`)
in its own nursery, and forgets the host when cancelled. A dial to several addresses shares
one deadline: a black-hole address (accepts, never speaks) costs its share, not the whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2pcache.identity import Identity
from p2pcache.net.config import PeersConfig
from p2pcache.net.conn_limits import ConnTrimmer, guard_of
from p2pcache.net.fetch import Fetched, FetchError, FetchRequest, FetchTimeout, fetch
from p2pcache.net.host import dial, full_addrs
from p2pcache.net.relay import CIRCUIT, dial_relayed
from p2pcache.net.warm import WarmConnections

log = logging.getLogger(__name__)

MIN_DIAL_S = 0.5  # an address's share of a dial deadline is never cut below this


class ProducerFeed(Protocol):
    """Producers heard in adverts (`p2pcache.net.directory.Directory`), for warm dialing."""

    def changed(self) -> trio.Event:
        """The event the next index change sets."""
        ...

    def producers(self) -> Mapping[str, Sequence[str]]:
        """Producer peer id -> its advertised addresses."""
        ...


class PeerConnections:
    """The host while it runs, and every dial the node makes."""

    def __init__(
        self,
        identity: Identity,
        config: PeersConfig | None = None,
        *,
        score: Callable[[str], float],
        is_banned: Callable[[str], bool],
    ) -> None:
        self.identity = identity
        self.config = config = config or PeersConfig()
        self.warm = WarmConnections(
            config.warm,
            identity.peer_id,
            connected=self.connected,
            dial=self.dial,
            score=score,
            is_banned=is_banned,
        )
        self.trimmer = ConnTrimmer(config.conn, score=score)
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None
        # Our /p2p-circuit addresses while we hold relay slots (set by the relay part).
        self.relayed: Callable[[], list[str]] = list

    @property
    def running(self) -> bool:
        return self._host is not None

    @property
    def host(self) -> IHost:
        """The running host (for the service's views and tests); FetchError when stopped."""
        if self._host is None:
            raise FetchError("the network is not running")
        return self._host

    def addrs(self) -> list[str]:
        """Our dialable addresses, each ending in /p2p/<peer id> (none while stopped);
        relayed ones first: we hold relay slots only when peers could not dial us directly."""
        return [*self.relayed(), *full_addrs(self._host)] if self._host is not None else []

    def connected(self) -> set[str]:
        return (
            {p.to_base58() for p in self._host.get_connected_peers()}
            if self._host is not None
            else set()
        )

    async def ensure_connected(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> None:
        """Connected to ``peer_id`` within ``timeout_s`` (all of it: waiting for a warm-up dial
        and dialing each address share it), else FetchError."""
        host = self.host
        pid = ID.from_base58(peer_id)
        deadline = trio.current_time() + timeout_s
        if pid not in host.get_connected_peers():
            await self.warm.wait_inflight(peer_id, timeout_s)  # a warm-up dial may be half done
        if pid in host.get_connected_peers() or not addrs:
            return  # without addrs: maybe reachable through the peerstore (new_stream dials)
        await self.dial(peer_id, addrs, deadline - trio.current_time())

    async def dial(self, peer_id: str, addrs: Sequence[str], timeout_s: float) -> None:
        """Connect to ``peer_id`` at the first of ``addrs`` that answers, all within
        ``timeout_s``, else FetchError. Each address gets an equal share of the time left (at
        least `MIN_DIAL_S`, at most the configured dial timeout), so addresses that accept and
        never speak cannot use up the deadline before a good one is tried."""
        host = self.host
        deadline = trio.current_time() + timeout_s
        last: Exception | None = None
        for i, a in enumerate(addrs):
            left = deadline - trio.current_time()
            if left <= 0:
                break
            share = min(self.config.dial_timeout_s, left, max(left / (len(addrs) - i), MIN_DIAL_S))
            try:
                if CIRCUIT in a:  # py-libp2p's swarm does not dial relayed addresses
                    await dial_relayed(host, a, share)
                else:
                    await dial(host, a if "/p2p/" in a else f"{a}/p2p/{peer_id}", share)
                return
            except Exception as exc:  # try the next address (TooSlowError, an ExceptionGroup...)
                last = exc
        if last is None or isinstance(last, trio.TooSlowError):
            raise FetchTimeout(f"cannot reach {peer_id[:16]} within {timeout_s:.1f} s")
        raise FetchError(f"cannot reach {peer_id[:16]}: {last!r}")

    async def fetch(
        self, peer_id: str, addrs: Sequence[str], req: FetchRequest, timeout_s: float
    ) -> Fetched:
        """Connect (if needed) and fetch, both within ``timeout_s``."""
        deadline = trio.current_time() + timeout_s
        await self.ensure_connected(peer_id, addrs, timeout_s)
        left = deadline - trio.current_time()
        if left <= 0:
            raise FetchTimeout(f"no time left to fetch from {peer_id[:16]}")
        return await fetch(self.host, peer_id, req, timeout_s=left)

    def conn_stats(self) -> dict[str, Any]:
        """Inbound admissions and refusals, and connections trimmed (for /admin/peers)."""
        guard = guard_of(self._host) if self._host is not None else None
        return {
            **(guard.snapshot() if guard is not None else {}),
            "connected": len(self.connected()),
            "trimmed": self.trimmer.trimmed,
        }

    def disconnect(self, peer_id: str) -> None:
        """Close the connection to a peer (soon, in the background; nothing while stopped)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect, peer_id)

    async def _disconnect(self, peer_id: str) -> None:
        try:
            with trio.move_on_after(5):
                await self.host.disconnect(ID.from_base58(peer_id))
        except Exception as exc:
            log.info("could not disconnect %s: %r", peer_id[:16], exc)

    async def _bootstrap(self) -> None:
        cfg = self.config
        pending = list(cfg.bootstrap)
        for _ in range(cfg.bootstrap_attempts):
            if not pending:
                return
            still = []
            for a in pending:
                try:
                    await dial(self.host, a, cfg.dial_timeout_s)
                    log.info("connected to bootstrap %s", a)
                # Dial errors may come as an ExceptionGroup, which is an Exception; a group that
                # holds a Cancelled is a BaseExceptionGroup and propagates.
                except Exception:
                    still.append(a)
            pending = still
            if pending:
                await trio.sleep(cfg.bootstrap_retry_s)
        if pending:
            log.warning("bootstrap peers unreachable: %s", pending)

    async def run(
        self,
        host: IHost,
        producers: ProducerFeed,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Use ``host`` until cancelled: bootstrap dials, warm producer dials, disconnects."""
        self._host = host
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._bootstrap)
                nursery.start_soon(self.warm.run, producers.changed, producers.producers)
                nursery.start_soon(self.trimmer.run, host)
                task_status.started()
                await trio.sleep_forever()  # the host is ours until cancelled
        finally:
            self._nursery = None
            self._host = None
