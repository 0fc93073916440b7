"""The node a volunteer runs: config, the composition root (`p2pcache.node.build`), the daemon."""

from p2pcache.node.config import ConfigError, NodeConfig, load_config

__all__ = ["ConfigError", "NodeConfig", "load_config"]
