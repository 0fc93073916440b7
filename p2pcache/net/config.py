"""Every setting of the network layer, one dataclass per part, in a module that does not load
libp2p (importing it takes over a second), so the node's config can name these defaults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from p2pcache.net.reputation import ReputationConfig
from p2pcache.net.warm import WarmConfig

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
DIAL_TIMEOUT_S = 10.0

__all__ = [
    "DEFAULT_LISTEN",
    "DIAL_TIMEOUT_S",
    "ConnLimits",
    "DirectoryConfig",
    "DiscoveryConfig",
    "KvNetConfig",
    "NetConfig",
    "PeersConfig",
    "ReachConfig",
    "RelayConfig",
    "ReputationConfig",
    "ServerLimits",
    "TierConfig",
    "VerifyConfig",
    "WarmConfig",
]


@dataclass(frozen=True)
class ConnLimits:
    """Inbound connection limits and trimming (`p2pcache.net.conn_limits`). An inbound
    connection is refused at once past ``max_per_ip`` from its IP or ``max_pending`` still in
    their handshake; a handshake (Noise + yamux) not done in ``handshake_timeout_s`` is closed.
    Above ``high_water`` connections the lowest-scored peers (older than ``grace_s``) are
    closed down to ``low_water``; ``max_connections`` is the hard cap."""

    max_per_ip: int = 8
    max_pending: int = 64
    handshake_timeout_s: float = 3.0
    high_water: int = 160
    low_water: int = 128
    max_connections: int = 256
    grace_s: float = 20.0
    trim_every_s: float = 1.0


@dataclass(frozen=True)
class PeersConfig:
    bootstrap: Sequence[str] = ()  # full multiaddrs ending in /p2p/<peer id>
    dial_timeout_s: float = DIAL_TIMEOUT_S
    bootstrap_retry_s: float = 2.0
    bootstrap_attempts: int = 30
    warm: WarmConfig = field(default_factory=WarmConfig)  # producers dialled ahead of need
    conn: ConnLimits = field(default_factory=ConnLimits)  # inbound limits, trimming


@dataclass(frozen=True)
class DirectoryConfig:
    ad_batch_s: float = 0.25  # new entries are batched this long into one advert
    readvertise_s: float = 30.0  # full inventory re-announced (new peers learn old entries)
    readvertise_max: int = 4096  # newest shared entries re-announced
    readvertise_min_gap_s: float = 2.0  # at most this often when new mesh peers keep joining
    max_ad_age_s: float = 600.0  # older adverts are stale


@dataclass(frozen=True)
class VerifyConfig:
    # Same model, same 2-core CPU: llama.cpp's batched passes and its one-token decodes use
    # different kernels (a row's logits move by up to ~2), so an honest answer can leave the
    # walk's choice at a near-tie. Measured (bench/bench_draft.py --noise, docs/benchmarks.md):
    # greedy divergences at margins up to 0.34, sampled ones with up to 0.098 of probability
    # between the two tokens. Within these bounds (about 1.5x the largest seen) a divergence
    # is not blamed (it is counted); beyond them it is a lie.
    near_tie_margin: float = 0.5
    near_tie_mass: float = 0.15


@dataclass(frozen=True)
class TierConfig:
    """L2 (`p2pcache.net.tier.PeerTier`)."""

    fetch_timeout_s: float = 10.0
    max_providers: int = 4  # tried per lookup
    max_entry_bytes: int = 4 * 1024 * 1024
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    cost_model: bool = True  # False: always try peers (benchmarks of the fetch path)
    # The whole L2 attempt (every dial and fetch, over all providers) ends by the time
    # generating the answer here would take (`CostModel.local_s`), never before
    # ``min_deadline_s`` (a fresh Noise + yamux dial on a loaded 2-core box) nor after
    # ``max_deadline_s``; then the request is answered from L3.
    min_deadline_s: float = 2.0
    max_deadline_s: float = 30.0


@dataclass(frozen=True)
class KvNetConfig:
    """KV prefix chunks over the network (`p2pcache.net.kv_tier.KvPeerTier`)."""

    enabled: bool = True
    min_score: float = 0.4  # a new peer scores 0.5; one unexplained timeout takes it to 0.33
    spot_check_rate: float = 0.1
    spot_check_tolerance: float = 0.5  # max |logit difference| (same hardware: 0; bad chunks: >> 1)
    max_fetch_bytes: int = 256 * 1024 * 1024
    max_providers: int = 3
    advertise_max: int = 2048  # shared chunk tips per inventory round
    cost_model: bool = True
    fetch_timeout_s: float = TierConfig.fetch_timeout_s


@dataclass
class ServerLimits:
    """The fetch server (`p2pcache.net.fetch.FetchServer`)."""

    request_timeout_s: float = 60.0
    max_streams_per_peer: int = 4
    frame_size: int | None = None  # body frame bytes; None: one fast-path yamux frame


@dataclass(frozen=True)
class ReachConfig:
    """Reachability checks (`p2pcache.net.reachability`): asking and answering."""

    enabled: bool = True
    quorum: int = 2  # peers that must agree on an address (2 of 3 asked)
    max_peers: int = 3  # asked per check
    max_addrs: int = 8  # addresses per request
    interval_s: float = 600.0  # between checks once decided
    retry_s: float = 15.0  # between checks while unknown
    request_timeout_s: float = 20.0  # one whole request (dial-backs included)
    dial_timeout_s: float = 5.0  # one dial-back
    per_peer_interval_s: float = 10.0  # served: at most one request per peer this often
    max_concurrent: int = 2  # served: dial-back requests at a time, all peers together


@dataclass(frozen=True)
class RelayConfig:
    """Circuit relay v2 (`p2pcache.net.relay`): serving relays and using them."""

    service: str = "auto"  # auto: serve once found public | on | off
    max_reservations: int = 32  # served: peers holding a slot at a time
    reservation_s: int = 3600  # served: slot lifetime (also the longest circuit)
    max_circuits: int = 4  # served: circuits per reserved peer
    max_circuit_bytes: int = 64 * 1024 * 1024  # served: data per circuit, both ways
    use_relays: bool = True  # when private, reserve a slot on a public peer
    relays: Sequence[str] = ()  # preferred relays (full multiaddrs); else connected peers
    reservation_timeout_s: float = 10.0
    dcutr: bool = True  # try to upgrade relayed connections to direct ones


@dataclass(frozen=True)
class DiscoveryConfig:
    """Finding the model's providers (`p2pcache.net.discovery`): rendezvous at the bootstrap
    peers (and mDNS-found peers), every node serving rendezvous for those who join through it."""

    enabled: bool = True
    serve: bool = True  # answer rendezvous for peers that bootstrap through this node
    mdns: bool = False  # LAN multicast discovery; off: it announces the node to the whole LAN
    first_interval_s: float = 0.5  # rounds this often until a provider is known (join time)
    interval_s: float = 5.0  # then this often (new providers, departed ones)
    ttl_s: int = 120  # registration TTL (the rendezvous minimum); servers also drop peers
    # that disconnect, so a departed peer vanishes within a round, not a TTL
    forget_s: float = 15.0  # a provider unlisted and unconnected this long is forgotten
    target_peers: int = 8  # connections discovery tops up to (the GossipSub mesh wants 6)
    dials_per_round: int = 4
    max_known: int = 256  # providers remembered (state bound)
    max_points: int = 8  # rendezvous points asked per round
    max_namespaces: int = 64  # namespaces a rendezvous server keeps (state bound)
    query_timeout_s: float = 5.0


@dataclass(frozen=True)
class NetConfig:
    listen: Sequence[str] = (DEFAULT_LISTEN,)
    psk: str | None = None  # 64 hex characters: only peers with the same key can connect
    fast_path: bool = True
    heartbeat_s: int = 1  # GossipSub heartbeat; the directory looks at the mesh as often
    peers: PeersConfig = field(default_factory=PeersConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    server: ServerLimits = field(default_factory=ServerLimits)
    tier: TierConfig = field(default_factory=TierConfig)
    kv: KvNetConfig = field(default_factory=KvNetConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    reach: ReachConfig = field(default_factory=ReachConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
