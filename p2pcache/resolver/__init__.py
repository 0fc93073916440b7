"""The lookup ladder that answers every request."""

from p2pcache.resolver.ladder import ExactTier, Keyed, Resolver, Tier
from p2pcache.resolver.types import Answer, Level, Request, Timings

__all__ = ["Answer", "ExactTier", "Keyed", "Level", "Request", "Resolver", "Tier", "Timings"]
