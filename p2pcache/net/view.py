"""What the rest of the node sees of the network: a narrow, typed view.

The HTTP app (`p2pcache.api`) and the daemon (`p2pcache.node`) hold a `NetworkView`, never the
libp2p service itself. `NoNetwork` is the view of a node without the network layer (and of a
node before its service starts): nothing to run, no peers.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio


class NetworkView(Protocol):
    """The libp2p side of a node, as the daemon and the admin API see it."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, dial the bootstrap peers, call ``task_status.started()`` once listening,
        then serve until cancelled."""
        ...

    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in ``/p2p/<peer id>``."""
        ...

    def peers(self) -> list[dict[str, Any]]:
        """Connected peers: ``peer_id``, ``addrs``, ``score``, ``banned``, mesh membership."""
        ...

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        """Per peer (or only ``peer_id``): at least ``peer_id``, ``score`` and ``banned``."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters shown by ``/admin/peers``."""
        ...

    def discovery_state(self) -> dict[str, Any]:
        """Discovery as ``/admin/status`` shows it: known providers, points, last lookup."""
        ...

    def reachability(self) -> dict[str, Any]:
        """``reachability`` (the last dial-back verdict), ``relay`` (slots held, relay
        service) and ``reach_server`` (dial-backs served), for ``/admin/status``."""
        ...

    async def wait_providers(
        self, key: str, level: str = "decoder_final", wait_s: float = 0.0
    ) -> list[str]:
        """Peer ids advertising ``key``, waiting up to ``wait_s`` for the first one."""
        ...


class NoNetwork:
    """A node without the network layer: nothing to start, no peers."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def addrs(self) -> list[str]:
        return []

    def peers(self) -> list[dict[str, Any]]:
        return []

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        return []

    def stats(self) -> dict[str, Any]:
        return {}

    def discovery_state(self) -> dict[str, Any]:
        return {"enabled": False}

    def reachability(self) -> dict[str, Any]:
        return {}

    async def wait_providers(
        self, key: str, level: str = "decoder_final", wait_s: float = 0.0
    ) -> list[str]:
        return []
