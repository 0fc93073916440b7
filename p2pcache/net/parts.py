"""What the tiers (`PeerTier`, `KvPeerTier`) receive of the network: narrow, typed views.

The service (`p2pcache.net.service.NetService`) owns the parts and their lifecycle; a tier
holds only the views below, each implemented by one part, so a tier never sees the service
and a test gives it small fakes instead.

- `PeerLink`: connections (`p2pcache.net.peers.PeerConnections`)
- `Listings`: the gossip index and our adverts (`p2pcache.net.directory.Directory`)
- `Judge`: what fetches say about peers (`p2pcache.net.trust.Trust`)
- `Ranking`: provider order and the cost model (`p2pcache.net.selection.Selection`)
- `Verifier`, `SpotChecker`: checks on the local model (`p2pcache.net.verify.ModelVerifier`,
  `p2pcache.net.kv_tier.ModelSpotChecker`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from p2pcache.keys import SamplingParams
from p2pcache.net.ads import AdEntry, Provider
from p2pcache.net.fetch import Fetched, FetchError, FetchRequest
from p2pcache.net.reputation import PeerRecord
from p2pcache.net.selection import CostModel
from p2pcache.net.verify import Verdict
from p2pcache.store import Entry


class PeerLink(Protocol):
    @property
    def running(self) -> bool:
        """True while the host listens (tiers pass otherwise)."""
        ...

    async def fetch(
        self, peer_id: str, addrs: Sequence[str], req: FetchRequest, timeout_s: float
    ) -> Fetched:
        """Connect to ``peer_id`` if needed (at ``addrs``) and fetch; a `FetchError` on failure."""
        ...


class Listings(Protocol):
    def providers(self, key: str, level: str = "decoder_final") -> list[Provider]:
        """Peers that advertised ``key`` at ``level``."""
        ...

    def forget(self, key: str, peer_id: str, level: str = "decoder_final") -> None:
        """``peer_id`` no longer has ``key`` (it answered not_found)."""
        ...

    def advertise(self, entry: Entry) -> None:
        """Announce a stored entry (private entries and other models' are ignored)."""
        ...

    async def announce(self, entry: Entry) -> None:
        """Publish the entry's advert now (a bounded wait), not in the next batch."""
        ...

    def advertise_ads(self, ads: Sequence[AdEntry]) -> None:
        """Announce ready-made ad entries (KV prefix chunk tips)."""
        ...


@dataclass(frozen=True)
class Proof:
    """A signed response that failed verification: enough for anyone to re-check the lie."""

    got: Fetched
    prompt: Sequence[int]
    params: SamplingParams


class Judge(Protocol):
    def record(self, peer_id: str) -> PeerRecord:
        """The peer's reputation now (a copy)."""
        ...

    def fetched(
        self,
        peer_id: str,
        nbytes: int,
        seconds: float,
        ttfb_s: float | None = None,
        draft_tokens: int = 0,
    ) -> None:
        """A fetch from the peer succeeded (and its value checked out: ``draft_tokens`` of an
        answer were the local model's own choices)."""
        ...

    def near_tie(self, peer_id: str, draft_tokens: int) -> None:
        """The peer's answer left the local choices within float noise at its token
        ``draft_tokens - 1``: not a lie, counted against the honest rate."""
        ...

    def fetch_failed(self, peer_id: str, exc: FetchError) -> bool:
        """Record what a failed fetch says about the peer; True when it counted against it."""
        ...

    async def convict(self, peer_id: str, reason: str, proof: Proof | None = None) -> None:
        """The peer served a wrong value: record it, publish the proof, ban when due."""
        ...


class Ranking(Protocol):
    cost: CostModel

    def ranked(self, providers: Sequence[Provider]) -> list[Provider]:
        """Best first, without ourselves and banned peers."""
        ...


class Verifier(Protocol):
    async def verify(
        self,
        entry: Entry,
        key: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        tail: bool = True,
    ) -> Verdict:
        """``entry`` walked as a draft by the local model (`p2pcache.net.verify`); with
        ``tail`` the verdict carries the local answer when the draft diverges."""
        ...


class SpotChecker(Protocol):
    async def spot_check(self, tokens: Sequence[int], n_chunks: int) -> float | None:
        """Max logit difference after the first ``n_chunks`` stored chunks vs a cold prefill
        (None: the chunks could not be restored, nothing to blame a peer for)."""
        ...
