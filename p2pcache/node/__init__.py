"""The node a volunteer runs: config, lifecycle, logs, the seam for the network service."""

from p2pcache.node.config import ConfigError, NodeConfig, load_config
from p2pcache.node.runtime import NetworkFactory, NetworkService, NodeRuntime, NoNetwork

__all__ = [
    "ConfigError",
    "NetworkFactory",
    "NetworkService",
    "NoNetwork",
    "NodeConfig",
    "NodeRuntime",
    "load_config",
]
