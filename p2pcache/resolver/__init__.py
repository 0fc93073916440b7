"""The lookup ladder that answers every request."""

from p2pcache.resolver.ladder import ExactTier, Keyed, Resolver, Tier
from p2pcache.resolver.types import (
    Answer,
    KvPeerDetails,
    Level,
    PeerDetails,
    Request,
    SemanticDetails,
    Timings,
)

__all__ = [
    "Answer",
    "ExactTier",
    "Keyed",
    "KvPeerDetails",
    "Level",
    "PeerDetails",
    "Request",
    "Resolver",
    "SemanticDetails",
    "Tier",
    "Timings",
]
