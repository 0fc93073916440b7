"""What a node is made of: the options of the Python API (`p2pcache.local.LocalNode`), which
the daemon's `NodeConfig` maps to (`p2pcache.node.build.node_options`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pcache.backend import BackendConfig
from p2pcache.kv import KvPolicy
from p2pcache.store import DEFAULT_SIZE_CAP


@dataclass(frozen=True)
class NodeOptions:
    """What a node is made of (the Python API's options; the daemon maps `NodeConfig` here)."""

    data_dir: str | Path | None = None  # None: $P2PCACHE_DATA_DIR or ~/.local/share/p2pcache
    model: str | Path | None = None  # None: the embedded default (Gemma 3 270M Q4_K_M)
    n_ctx: int = BackendConfig.n_ctx
    n_gpu_layers: int | None = BackendConfig.n_gpu_layers  # None: all layers on a GPU if any
    size_cap: int = DEFAULT_SIZE_CAP
    durable: bool = True
    kv_prefix: bool = KvPolicy.enabled  # resume L3 from stored KV prefixes (p2pcache.kv)
    kv_type: str = "f16"  # KV cache element type: "f16", "q8_0" or "q4_0" (part of kv_config)
    kv_chunk_tokens: int = KvPolicy.chunk_tokens
    semantic: bool = False  # run L1 (requests still opt in with Request(semantic=True))
    semantic_tau: float | None = None  # None: SemanticConfig.tau
    semantic_margin: float | None = None  # None: SemanticConfig.margin
    max_queue: int | None = None  # model calls that may wait; more are refused (None: no bound)
    queue_timeout_s: float | None = None  # longest wait for the model (None: no limit)
