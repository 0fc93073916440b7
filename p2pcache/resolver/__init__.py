"""The lookup ladder that answers every request."""

from p2pcache.resolver.ladder import ExactTier, KvRemote, Resolver, Tier
from p2pcache.resolver.types import (
    Answer,
    Keyed,
    KvPeerDetails,
    Level,
    PeerDetails,
    Request,
    SemanticDetails,
    Timings,
    answer_from_output,
)

__all__ = [
    "Answer",
    "ExactTier",
    "Keyed",
    "KvPeerDetails",
    "KvRemote",
    "Level",
    "PeerDetails",
    "Request",
    "Resolver",
    "SemanticDetails",
    "Tier",
    "Timings",
    "answer_from_output",
]
