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
    "DirectoryConfig",
    "KvNetConfig",
    "NetConfig",
    "PeersConfig",
    "ReputationConfig",
    "ServerLimits",
    "TierConfig",
    "VerifyConfig",
    "WarmConfig",
]


@dataclass(frozen=True)
class PeersConfig:
    bootstrap: Sequence[str] = ()  # full multiaddrs ending in /p2p/<peer id>
    dial_timeout_s: float = DIAL_TIMEOUT_S
    bootstrap_retry_s: float = 2.0
    bootstrap_attempts: int = 30
    warm: WarmConfig = field(default_factory=WarmConfig)  # producers dialled ahead of need


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
