"""The node's composition root: every part is built once, in order, and given what it uses.

    open_local(options)             data dir, identity, store, model + worker, KV prefixes, L1
    build_network(...)              reputation, connections, directory, trust, selection,
                                    L2, KV peers, fetch server, and the service running them
    build_resolver(local, network)  the ladder: its tiers, KV prefix cache and KV peers

No part is changed after it is built. The daemon's `NodeConfig` is mapped to each part's
config here and nowhere else (`node_options`, `net_config`, `api_settings`); each default is
defined once, in the part's own config, which `NodeConfig` and `NodeOptions` name.

The network modules are imported where the network is built: libp2p takes over a second to
import, which the Python API (`p2pcache.local.LocalNode`) and the CLI never need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from p2pcache.api.context import ApiSettings
from p2pcache.backend import BackendConfig, BackendWorker, LlamaBackend, resolve_model_path
from p2pcache.identity import Identity
from p2pcache.keys import ModelHashMemo, model_hash
from p2pcache.keys.model_hash import ProgressFn
from p2pcache.kv import KvChunkStore, KvPolicy, KvPrefixCache, kv_backend_options
from p2pcache.net.config import (
    ConnLimits,
    DiscoveryConfig,
    KvNetConfig,
    NetConfig,
    PeersConfig,
    ReachConfig,
    RelayConfig,
    WarmConfig,
)
from p2pcache.node.config import NodeConfig
from p2pcache.node.options import NodeOptions
from p2pcache.paths import DataDir
from p2pcache.resolver import Resolver, Tier
from p2pcache.semantic import SemanticConfig, SemanticTier
from p2pcache.store import Store

if TYPE_CHECKING:
    from p2pcache.metrics import NodeMetrics
    from p2pcache.net.fetch import FetchServer, ValueSource
    from p2pcache.net.kv_tier import KvPeerTier
    from p2pcache.net.service import NetService
    from p2pcache.net.tier import PeerTier

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str], ProgressFn]
"""Given a description of a long step, returns the callback that reports its progress."""


@dataclass
class LocalParts:
    """A node without its network: what `open_local` opened (and `close` closes)."""

    data_dir: DataDir
    identity: Identity
    model_hash: str
    store: Store
    backend: LlamaBackend
    worker: BackendWorker
    kv: KvPrefixCache | None  # None: off, or the model's KV layout cannot be cut
    semantic: SemanticTier | None  # L1, when NodeOptions.semantic

    def close(self) -> None:
        if self.semantic is not None:
            self.semantic.close()
        self.store.close()
        self.backend.close()


@dataclass(frozen=True)
class Network:
    """The network side of a node: the service the daemon runs and the tiers it feeds."""

    service: NetService
    l2: PeerTier | None  # None without a model to verify with
    kv: KvPeerTier | None  # None without KV prefixes (or with kv_net off)


# -- NodeConfig -> the parts' configs ----------------------------------------------------------


def node_options(config: NodeConfig) -> NodeOptions:
    return NodeOptions(
        data_dir=config.data_dir,
        model=config.model,
        n_ctx=config.n_ctx,
        n_gpu_layers=config.n_gpu_layers,
        size_cap=config.size_cap,
        kv_prefix=config.kv_prefix,
        kv_type=config.kv_type,
        semantic=config.semantic,
        semantic_tau=config.semantic_tau,
        semantic_margin=config.semantic_margin,
        max_queue=config.max_queue,
        queue_timeout_s=config.queue_timeout_s,
    )


def net_config(config: NodeConfig, bootstrap: Sequence[str], psk: str | None) -> NetConfig:
    """``bootstrap``: the configured peers plus those found through ``bootstrap_http``."""
    return NetConfig(
        listen=tuple(config.listen),
        psk=psk,
        peers=PeersConfig(
            bootstrap=tuple(bootstrap),
            warm=WarmConfig(max_peers=config.warm_peers),
            conn=ConnLimits(max_per_ip=config.max_conns_per_ip),
        ),
        kv=KvNetConfig(
            enabled=config.kv_net,
            min_score=config.kv_peer_min_score,
            spot_check_rate=config.kv_spot_check_rate,
        ),
        discovery=DiscoveryConfig(enabled=config.discovery, mdns=config.mdns),
        reach=ReachConfig(enabled=config.reachability),
        relay=RelayConfig(service=config.relay_service),
    )


def api_settings(config: NodeConfig) -> ApiSettings:
    return ApiSettings(
        admin_token=config.admin_token,
        default_max_tokens=config.default_max_tokens,
        max_tokens_limit=config.max_tokens_limit,
        max_body_bytes=config.max_body_bytes,
        share_by_default=config.share_by_default,
        listen=tuple(config.listen),
    )


def semantic_config(options: NodeOptions) -> SemanticConfig:
    given = {"tau": options.semantic_tau, "margin": options.semantic_margin}
    return replace(SemanticConfig(), **{k: v for k, v in given.items() if v is not None})


# -- building ------------------------------------------------------------------------------------


def open_local(options: NodeOptions, progress: ProgressFactory | None = None) -> LocalParts:
    """Open the data dir, the store and the model (blocking: seconds). On failure whatever was
    opened is closed again."""
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
    with ExitStack() as undo:
        store = Store(data_dir.store, size_cap=options.size_cap, durable=options.durable)
        undo.callback(store.close)
        backend = LlamaBackend(
            BackendConfig(
                model_path=model_path,
                n_ctx=options.n_ctx,
                n_gpu_layers=options.n_gpu_layers,
                **kv_backend_options(options.kv_type),
            )
        )
        undo.callback(backend.close)
        worker = BackendWorker(
            backend, max_waiting=options.max_queue, max_wait_s=options.queue_timeout_s
        )
        kv = None
        if options.kv_prefix:
            cache = KvPrefixCache(
                backend, KvChunkStore(store), digest, KvPolicy(chunk_tokens=options.kv_chunk_tokens)
            )
            kv = cache if cache.enabled else None
        semantic = None
        if options.semantic:  # L1's index lives in <data dir>/semantic
            semantic = SemanticTier(
                store, worker, digest, data_dir.root / "semantic", semantic_config(options)
            )
        undo.pop_all()
    log.info(
        "node %s: model %s (%s), data dir %s",
        identity.peer_id,
        model_path.name,
        digest[:12],
        data_dir.root,
    )
    return LocalParts(data_dir, identity, digest, store, backend, worker, kv, semantic)


def build_network(
    identity: Identity,
    store: Store,
    model_hash: str,
    config: NetConfig,
    *,
    worker: BackendWorker | None = None,
    kv: KvPrefixCache | None = None,
    metrics: NodeMetrics | None = None,
    sources: Sequence[ValueSource] | None = None,
    server_class: type[FetchServer] | None = None,
) -> Network:
    """The network parts, in dependency order. Without ``worker`` (no model) there is no L2
    and evidence is not checked; without ``kv`` no KV chunks are fetched, advertised or
    served. ``sources``: what the fetch server serves (default: the store's shared entries,
    and the shared KV chunks when the KV tier runs); ``server_class``: a `FetchServer`
    subclass (tests use both to make a node lie or stall)."""
    from p2pcache.net.directory import Directory, StoreInventory
    from p2pcache.net.fetch import ChainSource, FetchServer, StoreSource
    from p2pcache.net.kv_tier import KvInventory, KvPeerTier, KvSource, ModelSpotChecker
    from p2pcache.net.peers import PeerConnections
    from p2pcache.net.reputation import Reputation
    from p2pcache.net.selection import Selection
    from p2pcache.net.service import NetService
    from p2pcache.net.tier import PeerTier
    from p2pcache.net.trust import Trust
    from p2pcache.net.verify import ModelVerifier

    kv = kv if config.kv.enabled else None
    rep = Reputation(store.env, config.reputation)
    selection = Selection(rep.get, identity.peer_id)
    connections = PeerConnections(identity, config.peers, score=rep.score, is_banned=rep.is_banned)
    inventories = [StoreInventory(store, model_hash, config.directory.readvertise_max)]
    if kv is not None:
        inventories.append(KvInventory(kv, config.kv.advertise_max))
    directory = Directory(
        identity,
        model_hash,
        config.directory,
        addrs=connections.addrs,
        is_banned=rep.is_banned,
        inventories=inventories,
        heartbeat_s=config.heartbeat_s,
    )
    directory.index.score = rep.score  # a full key keeps its best-reputed providers
    verifier = ModelVerifier(worker, model_hash, config.tier.verify) if worker is not None else None
    trust = Trust(
        identity, model_hash, rep, verifier, on_ban=(directory.forget_peer, connections.disconnect)
    )
    parts = {
        "peers": connections,
        "listings": directory,
        "judge": trust,
        "ranking": selection,
        "metrics": metrics,
    }
    l2 = kv_tier = None
    if verifier is not None:
        l2 = PeerTier(model_hash, store, identity, verifier=verifier, config=config.tier, **parts)
    if kv is not None and worker is not None:
        kv_tier = KvPeerTier(
            kv, model_hash, checker=ModelSpotChecker(worker, kv), config=config.kv, **parts
        )
    if sources is None:
        sources = [
            StoreSource(store, model_hash),
            *([KvSource(kv, model_hash)] if kv_tier is not None else []),
        ]
    server = (server_class or FetchServer)(
        identity,
        ChainSource(*sources),
        config.server,
        is_banned=rep.is_banned,
        on_served=metrics.bytes_served.inc if metrics is not None else lambda _n: None,
    )
    service = NetService(
        identity,
        model_hash,
        config,
        connections=connections,
        directory=directory,
        trust=trust,
        server=server,
        l2=l2,
        kv=kv_tier,
    )
    return Network(service, l2, kv_tier)


NetworkBuilder = Callable[[LocalParts, NetConfig, "NodeMetrics"], Network]
"""How the daemon gets its network from the local parts (tests pass one that makes a node lie)."""


def local_network(local: LocalParts, config: NetConfig, metrics: NodeMetrics) -> Network:
    """The network of a node: serves, advertises and fetches what ``local`` has."""
    return build_network(
        local.identity,
        local.store,
        local.model_hash,
        config,
        worker=local.worker,
        kv=local.kv,
        metrics=metrics,
    )


def build_resolver(local: LocalParts, network: Network | None = None) -> Resolver:
    """The ladder: L0, then L1 (when on), then L2 (with a network); L3 resumes from KV
    prefixes (when on), fetching missing chunks from peers (with a network)."""
    tiers: list[Tier] = []
    if local.semantic is not None:
        tiers.append(local.semantic)
    if network is not None and network.l2 is not None:
        tiers.append(network.l2)
    kv_remote = network.kv if network is not None and local.kv is not None else None
    return Resolver(
        local.store,
        local.worker,
        local.model_hash,
        local.identity,
        tiers=tiers,
        kv=local.kv,
        kv_remote=kv_remote,
    )
