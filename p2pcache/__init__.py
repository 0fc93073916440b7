"""p2pcache (Open Transformer DB): a peer-to-peer cache network for LLM inference."""

from p2pcache.keys import SamplingParams
from p2pcache.local import LocalNode, NodeOptions
from p2pcache.resolver import Answer, Request
from p2pcache.version import __version__

__all__ = ["Answer", "LocalNode", "NodeOptions", "Request", "SamplingParams", "__version__"]
