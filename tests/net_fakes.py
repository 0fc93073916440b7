"""Small fakes of the network parts the tiers receive (`p2pcache.net.parts`), for unit tests
of `PeerTier` and `KvPeerTier` without a host, gossip or model: each records what the tier
asked of it and answers what the test set up."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pcache.backend import Divergence, DraftOutcome, Generation
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.net.ads import AdEntry, Provider
from p2pcache.net.fetch import Busy, Fetched, FetchError, FetchRequest, NotFound, ResponseHeader
from p2pcache.net.parts import Proof
from p2pcache.net.reputation import PeerRecord
from p2pcache.net.verify import Verdict
from p2pcache.store import Entry


def fetched(body: bytes, server: str = "server", seconds: float = 0.01) -> Fetched:
    """A fetch result carrying ``body`` (the header is not what the tiers read)."""
    h = ResponseHeader(
        "00" * 32,
        "00" * 32,
        "decoder_final",
        None,
        len(body),
        hashlib.sha256(body).hexdigest(),
        "me",
        server,
        1,
    )
    return Fetched(h, body, seconds, ttfb=seconds / 2)


@dataclass
class FakePeers:
    """`PeerLink`: each peer answers with a canned `Fetched`, or raises a canned `FetchError`."""

    answers: dict[str, Fetched | FetchError | Callable[[FetchRequest], Fetched]] = field(
        default_factory=dict
    )
    running: bool = True
    asked: list[tuple[str, FetchRequest]] = field(default_factory=list)

    async def fetch(
        self, peer_id: str, addrs: Sequence[str], req: FetchRequest, timeout_s: float
    ) -> Fetched:
        self.asked.append((peer_id, req))
        answer = self.answers.get(peer_id, NotFound("no such value"))
        if isinstance(answer, FetchError):
            raise answer
        return answer(req) if callable(answer) else answer


@dataclass
class FakeListings:
    """`Listings` over a dict: (level, key) -> providers; records forgets and adverts."""

    by_key: dict[tuple[str, str], list[Provider]] = field(default_factory=dict)
    forgotten: list[tuple[str, str, str]] = field(default_factory=list)
    advertised: list[Entry] = field(default_factory=list)
    ads: list[AdEntry] = field(default_factory=list)

    def offer(self, key: str, *peers: str, level: str = "decoder_final", size: int = 100) -> None:
        self.by_key[(level, key)] = [Provider(p, (), size, "00" * 32, 0.0) for p in peers]

    def providers(self, key: str, level: str = "decoder_final") -> list[Provider]:
        return list(self.by_key.get((level, key), []))

    def forget(self, key: str, peer_id: str, level: str = "decoder_final") -> None:
        self.forgotten.append((key, peer_id, level))
        self.by_key[(level, key)] = [
            p for p in self.by_key.get((level, key), []) if p.peer_id != peer_id
        ]

    def advertise(self, entry: Entry) -> None:
        self.advertised.append(entry)

    async def announce(self, entry: Entry) -> None:
        self.advertised.append(entry)

    def advertise_ads(self, ads: Sequence[AdEntry]) -> None:
        self.ads.extend(ads)


@dataclass
class FakeJudge:
    """`Judge` that keeps what it was told. Records come from ``records`` (a real `Reputation`'s
    ``get`` where a test needs real scores), else fresh ones."""

    records: Callable[[str], PeerRecord] = PeerRecord
    successes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (peer, error class)
    convicted: list[tuple[str, str, Proof | None]] = field(default_factory=list)

    def record(self, peer_id: str) -> PeerRecord:
        return self.records(peer_id)

    near_ties: list[tuple[str, int]] = field(default_factory=list)

    def fetched(
        self,
        peer_id: str,
        nbytes: int,
        seconds: float,
        ttfb_s: float | None = None,
        draft_tokens: int = 0,
    ) -> None:
        self.successes.append(peer_id)

    def near_tie(self, peer_id: str, draft_tokens: int) -> None:
        self.near_ties.append((peer_id, draft_tokens))

    def fetch_failed(self, peer_id: str, exc: FetchError) -> bool:
        self.failures.append((peer_id, type(exc).__name__))
        return not isinstance(exc, (NotFound, Busy))  # as `Trust.fetch_failed` (tested on its own)

    async def convict(self, peer_id: str, reason: str, proof: Proof | None = None) -> None:
        self.convicted.append((peer_id, reason, proof))


LOCAL_TOKENS = [9, 8]  # what the fake local model answers after a divergence at token 0


@dataclass
class FakeVerifier:
    """`Verifier`: an entry is the local answer unless its producer is in ``liars`` (it
    diverges at token 0, outside the noise: the local answer is `LOCAL_TOKENS`), in
    ``near_ties`` (the same, within the noise) or in ``malformed`` (refused unread)."""

    liars: set[str] = field(default_factory=set)
    near_ties: set[str] = field(default_factory=set)
    malformed: set[str] = field(default_factory=set)
    checked: list[str] = field(default_factory=list)

    async def verify(
        self,
        entry: Entry,
        key: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        tail: bool = True,
    ) -> Verdict:
        self.checked.append(entry.producer)
        draft = list(entry.output.tokens)
        if entry.producer in self.malformed:
            return Verdict("malformed", "bad producer signature", ms=0.5)
        if entry.producer in self.liars | self.near_ties:
            lie = entry.producer in self.liars
            div = Divergence(0, draft[0], LOCAL_TOKENS[0], 5.0 if lie else 0.01, 3 if lie else 1)
            gen = Generation(LOCAL_TOKENS, "local", "stop", len(prompt), 1.0, 1.0)
            out = DraftOutcome(gen if tail else None, 0, div, len(draft), 1.0)
            return Verdict("lie" if lie else "near_tie", "token 0: claimed, local", 0, 1.0, out)
        gen = Generation(draft, entry.output.text, entry.output.finish_reason, len(prompt), 2.0, 0)
        return Verdict(
            "match", "verified", -1, 2.0, DraftOutcome(gen, len(draft), None, len(draft), 2.0)
        )


@dataclass
class FakeSpotChecker:
    """`SpotChecker` answering a fixed logit difference."""

    diff: float | None = 0.0
    checked: list[int] = field(default_factory=list)

    async def spot_check(self, tokens: Sequence[int], n_chunks: int) -> float | None:
        self.checked.append(n_chunks)
        return self.diff


def signed_entry(
    producer: Identity,
    key: str,
    model_hash: str,
    params: SamplingParams,
    tokens: Sequence[int] = (5, 6, 7),
    text: str = "xyz",
) -> Entry:
    from p2pcache.store import Output

    e = Entry(
        input_sha256=key,
        model_hash=model_hash,
        cache_level="decoder_final",
        output=Output(list(tokens), text),
        params=params.to_dict(),
        privacy_flag=False,
        producer=producer.peer_id,
    )
    e.signature = producer.sign(e.signing_payload())
    return e
