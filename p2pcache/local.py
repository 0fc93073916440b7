"""A local cache node: store + model + resolver, opened from a data dir (no network).

This is the Python API::

    with LocalNode.open(NodeOptions(data_dir="/tmp/otd")) as node:
        answer = trio.run(node.resolve, Request(prompt="Hello"))
"""

from __future__ import annotations

from p2pcache.backend import TokenHook
from p2pcache.node.build import LocalParts, NodeOptions, ProgressFactory, build_resolver, open_local
from p2pcache.resolver import Answer, Request, Resolver

__all__ = ["LocalNode", "NodeOptions", "ProgressFactory"]


class LocalNode:
    """The parts `open_local` opened and the resolver over them."""

    def __init__(self, parts: LocalParts, resolver: Resolver) -> None:
        self.parts = parts
        self.resolver = resolver
        self.data_dir = parts.data_dir
        self.identity = parts.identity
        self.model_hash = parts.model_hash
        self.store = parts.store
        self.backend = parts.backend
        self.worker = parts.worker
        self.kv = parts.kv  # KV prefix reuse, when NodeOptions.kv_prefix (and the model allows it)
        self.semantic = parts.semantic  # the L1 tier, when NodeOptions.semantic

    @classmethod
    def open(
        cls, options: NodeOptions | None = None, progress: ProgressFactory | None = None
    ) -> LocalNode:
        parts = open_local(options or NodeOptions(), progress)
        return cls(parts, build_resolver(parts))

    async def resolve(self, request: Request, on_token: TokenHook | None = None) -> Answer:
        """``on_token``: see `Resolver.resolve` (live tokens of an L3 computation)."""
        return await self.resolver.resolve(request, on_token)

    def close(self) -> None:
        self.parts.close()

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
