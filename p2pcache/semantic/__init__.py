"""L1: semantic reuse of cached answers for paraphrased prompts, behind a quality gate."""

from p2pcache.semantic.embedder import Embedder, EmbedderUnavailable
from p2pcache.semantic.gate import Gate, GateConfig, GateResult
from p2pcache.semantic.index import SemanticIndex, SemanticRecord
from p2pcache.semantic.tier import SemanticConfig, SemanticTier, request_text

__all__ = [
    "Embedder",
    "EmbedderUnavailable",
    "Gate",
    "GateConfig",
    "GateResult",
    "SemanticConfig",
    "SemanticIndex",
    "SemanticRecord",
    "SemanticTier",
    "request_text",
]
