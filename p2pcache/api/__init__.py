"""The node's HTTP API: OpenAI-compatible endpoints, admin endpoints, Prometheus metrics.

`create_app` takes a `NodeContext` (what the node hands the app); nothing here imports
`p2pcache.node`.
"""

from p2pcache.api.app import create_app
from p2pcache.api.context import ApiSettings, NodeContext

__all__ = ["ApiSettings", "NodeContext", "create_app"]
