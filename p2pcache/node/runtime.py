"""What a running node is made of, and the seam where the network service plugs in.

The daemon (`p2pcache.node.daemon`) builds one `NodeRuntime` and hands it to the HTTP app
and, when there is one, to the network service. The network layer (``p2pcache/net``) provides
a factory ``create_network_service(runtime) -> NetworkService``; the daemon starts the service
in the node's nursery with ``await nursery.start(service.run)`` before HTTP opens, and cancels
it after HTTP has drained on shutdown. Until then `NoNetwork` answers the admin endpoints
(``addrs``/``peers``/``reputation`` empty).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pcache.node.config import NodeConfig

if TYPE_CHECKING:
    from p2pcache.api.metrics import NodeMetrics
    from p2pcache.local import LocalNode

log = logging.getLogger(__name__)


class NetworkService(Protocol):
    """The libp2p side of a node, as the daemon and the admin API see it."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``runtime.config.listen``, dial ``runtime.bootstrap``, call
        ``task_status.started()`` once listening, then serve until cancelled."""
        ...

    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in ``/p2p/<peer id>``."""
        ...

    def peers(self) -> list[dict[str, Any]]:
        """Connected/known peers: at least ``peer_id`` and ``addrs`` per peer."""
        ...

    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        """Per peer (or only ``peer_id``): at least ``peer_id``, ``score`` (float) and
        ``banned`` (bool)."""
        ...

    # Optional (looked up with hasattr/getattr, NoNetwork has them):
    #   stats() -> dict                      counters shown by /admin/peers
    #   async wait_providers(key, level, wait_s) -> list[str]   /admin/providers


NetworkFactory = Callable[["NodeRuntime"], NetworkService]


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

    async def wait_providers(self, key: str, level: str = "decoder_final", wait_s: float = 0.0) -> list[str]:
        return []


def load_network_factory() -> NetworkFactory | None:
    """``p2pcache.net.service.create_network_service`` once the network layer provides it."""
    import importlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("p2pcache.net.service")
    except ModuleNotFoundError:
        return None
    if spec is None:
        return None
    service = importlib.import_module("p2pcache.net.service")  # a broken module is a real error
    return getattr(service, "create_network_service", None)


@dataclass
class NodeRuntime:
    config: NodeConfig
    local: LocalNode
    metrics: NodeMetrics
    model_id: str
    network: NetworkService = field(default_factory=NoNetwork)
    bootstrap: list[str] = field(default_factory=list)  # config.bootstrap + resolved bootstrap_http
    http_urls: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    draining: bool = False

    @property
    def share_by_default(self) -> bool:
        return self.config.share_by_default
