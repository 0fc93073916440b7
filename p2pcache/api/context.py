"""What the HTTP app is given: the parts of a running node it serves, built by the node.

The app never imports `p2pcache.node`; the node's composition root builds a `NodeContext`
and hands it to `p2pcache.api.create_app`.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from p2pcache.backend import BackendWorker
from p2pcache.metrics import NodeMetrics
from p2pcache.net.view import NetworkView, NoNetwork
from p2pcache.resolver import Resolver
from p2pcache.store import Store


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface.
    Any other host name counts as reachable from outside: the safe answer when in doubt."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, as a dual-stack listener reports it
    return ip.is_loopback


@dataclass(frozen=True)
class ApiSettings:
    """The node configuration the HTTP app reads (mapped from `NodeConfig` in one place)."""

    # If set, /admin/* and /metrics need this bearer token; if not, they answer loopback
    # clients only (the daemon generates one when HTTP binds a non-loopback address).
    admin_token: str | None = None
    default_max_tokens: int = 128
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1 << 20
    share_by_default: bool = False
    listen: tuple[str, ...] = ()  # the configured libp2p listen multiaddrs (shown by /admin/status)


@dataclass
class NodeContext:
    """A running node as the HTTP app sees it. ``draining`` and ``http_urls`` change while the
    node runs (the daemon sets them); everything else is fixed once built."""

    settings: ApiSettings
    resolver: Resolver
    store: Store
    worker: BackendWorker
    peer_id: str
    model_hash: str
    model_id: str
    model_path: Path  # the GGUF file (shown by /admin/status)
    n_ctx: int  # the context window (the model card's x_context_window)
    data_dir: Path  # the node's data dir root (shown by /admin/status)
    metrics: NodeMetrics
    network: NetworkView = field(default_factory=NoNetwork)
    bootstrap: list[str] = field(default_factory=list)
    http_urls: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    draining: bool = False
