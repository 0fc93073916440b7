"""The node's HTTP API: OpenAI-compatible endpoints, admin endpoints, Prometheus metrics."""

from p2pcache.api.app import create_app
from p2pcache.api.metrics import NodeMetrics

__all__ = ["NodeMetrics", "create_app"]
