"""A local cache node: store + model + resolver, opened from a data dir.

This is the Python API::

    with LocalNode.open(NodeOptions(data_dir="/tmp/otd")) as node:
        answer = trio.run(node.resolve, Request(prompt="Hello"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pcache.backend import BackendConfig, BackendWorker, LlamaBackend, resolve_model_path
from p2pcache.identity import Identity
from p2pcache.keys import ModelHashMemo, model_hash
from p2pcache.keys.model_hash import ProgressFn
from p2pcache.paths import DataDir
from p2pcache.resolver import Answer, Request, Resolver
from p2pcache.store import DEFAULT_SIZE_CAP, Store

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str], ProgressFn]
"""Given a description of a long step, returns the callback that reports its progress."""


@dataclass(frozen=True)
class NodeOptions:
    data_dir: str | Path | None = None  # None: $P2PCACHE_DATA_DIR or ~/.local/share/p2pcache
    model: str | Path | None = None  # None: the embedded default (Gemma 3 270M Q4_K_M)
    n_ctx: int = 8192
    n_gpu_layers: int | None = None  # None: all layers on the GPU when there is one
    size_cap: int = DEFAULT_SIZE_CAP
    durable: bool = True


class LocalNode:
    def __init__(
        self,
        data_dir: DataDir,
        store: Store,
        backend: LlamaBackend,
        identity: Identity,
        model_hash: str,
    ) -> None:
        self.data_dir = data_dir
        self.store = store
        self.backend = backend
        self.identity = identity
        self.model_hash = model_hash
        self.worker = BackendWorker(backend)
        self.resolver = Resolver(store, self.worker, model_hash, identity)

    @classmethod
    def open(cls, options: NodeOptions = NodeOptions(), progress: ProgressFactory | None = None) -> LocalNode:
        data_dir = DataDir.resolve(options.data_dir)
        data_dir.root.mkdir(parents=True, exist_ok=True)
        model_path = resolve_model_path(
            options.model, progress("Assembling the default model") if progress else None
        )
        digest = model_hash(
            model_path,
            ModelHashMemo(data_dir.model_hash_memo),
            progress(f"Hashing {model_path.name}") if progress else None,
        )
        identity = Identity.load_or_create(data_dir.identity_key)
        store = Store(data_dir.store, size_cap=options.size_cap, durable=options.durable)
        try:
            backend = LlamaBackend(
                BackendConfig(model_path=model_path, n_ctx=options.n_ctx, n_gpu_layers=options.n_gpu_layers)
            )
        except BaseException:
            store.close()
            raise
        log.info("node %s: model %s (%s), data dir %s", identity.peer_id, model_path.name, digest[:12], data_dir.root)
        return cls(data_dir, store, backend, identity, digest)

    async def resolve(self, request: Request) -> Answer:
        return await self.resolver.resolve(request)

    def close(self) -> None:
        self.store.close()
        self.backend.llm.close()

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
