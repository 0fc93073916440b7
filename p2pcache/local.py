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

from p2pcache.backend import BackendConfig, BackendWorker, LlamaBackend, TokenHook, resolve_model_path
from p2pcache.identity import Identity
from p2pcache.keys import ModelHashMemo, model_hash
from p2pcache.keys.model_hash import ProgressFn
from p2pcache.kv import KvChunkStore, KvPolicy, KvPrefixCache, kv_backend_options
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
    kv_prefix: bool = True  # resume L3 from stored KV prefixes (p2pcache.kv)
    kv_type: str = "f16"  # KV cache element type: "f16", "q8_0" or "q4_0" (part of kv_config)
    kv_chunk_tokens: int = 16
    semantic: bool = False  # run L1 (requests still opt in with Request(semantic=True))
    semantic_tau: float | None = None  # None: p2pcache.semantic.tier.DEFAULT_TAU
    semantic_margin: float | None = None  # None: p2pcache.semantic.gate.DEFAULT_MARGIN


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
        self.semantic = None  # the L1 tier, when NodeOptions.semantic (see enable_semantic)
        self.kv: KvPrefixCache | None = None  # KV prefix reuse, when NodeOptions.kv_prefix

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
                BackendConfig(
                    model_path=model_path, n_ctx=options.n_ctx, n_gpu_layers=options.n_gpu_layers,
                    **kv_backend_options(options.kv_type),
                )
            )
        except BaseException:
            store.close()
            raise
        log.info("node %s: model %s (%s), data dir %s", identity.peer_id, model_path.name, digest[:12], data_dir.root)
        node = cls(data_dir, store, backend, identity, digest)
        if options.kv_prefix:
            node.enable_kv_prefix(KvPolicy(chunk_tokens=options.kv_chunk_tokens))
        if options.semantic:
            try:
                node.enable_semantic(options)
            except BaseException:
                node.close()
                raise
        return node

    def enable_semantic(self, options: NodeOptions) -> None:
        """Add L1 right after L0 (index in ``<data dir>/semantic``)."""
        from p2pcache.semantic import SemanticConfig, SemanticTier

        cfg = SemanticConfig()
        overrides = {"tau": options.semantic_tau, "margin": options.semantic_margin}
        cfg = SemanticConfig(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        self.semantic = SemanticTier(self.store, self.worker, self.model_hash, self.data_dir.root / "semantic", cfg)
        self.resolver.tiers.insert(1, self.semantic)

    def enable_kv_prefix(self, policy: KvPolicy) -> None:
        """L3 resumes from the longest stored KV prefix (chunks in this store's LMDB)."""
        self.kv = KvPrefixCache(self.backend, KvChunkStore(self.store), self.model_hash, policy)
        self.resolver.kv = self.kv if self.kv.enabled else None

    async def resolve(self, request: Request, on_token: TokenHook | None = None) -> Answer:
        """``on_token``: see `Resolver.resolve` (live tokens of an L3 computation)."""
        return await self.resolver.resolve(request, on_token)

    def close(self) -> None:
        if self.semantic is not None:
            self.semantic.close()
        self.store.close()
        self.backend.llm.close()

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
