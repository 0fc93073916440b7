"""The L2 tier (`PeerTier`), the KV tier (`KvPeerTier`) and the parts they lean on, each given
small fakes of the network parts it receives (tests/net_fakes.py): no host, gossip or model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from p2pcache.backend import BackendConfig, Generation
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.kv import (
    KvChunkStore,
    KvConfig,
    KvPolicy,
    PendingChunks,
    PrefixGeneration,
    chunk_hashes,
)
from p2pcache.net.ads import Provider
from p2pcache.net.config import KvNetConfig
from p2pcache.net.fetch import BadResponse, Busy, FetchError, FetchTimeout, NotFound, entry_to_wire
from p2pcache.net.kv_tier import KvPeerTier, encode_body
from p2pcache.net.parts import Proof
from p2pcache.net.peer_keys import verify_by_peer
from p2pcache.net.reputation import PeerRecord, Reputation
from p2pcache.net.selection import Selection
from p2pcache.net.tier import PeerTier
from p2pcache.net.trust import Trust
from p2pcache.resolver import Keyed, Request
from p2pcache.store import Store
from tests.net_fakes import (
    LOCAL_TOKENS,
    FakeJudge,
    FakeListings,
    FakePeers,
    FakeSpotChecker,
    FakeVerifier,
    fetched,
    signed_entry,
)

MH = "ab" * 32
PARAMS = SamplingParams(max_tokens=8)
PROMPT = [2, 10, 11]
KEY = input_sha256(MH, PROMPT, PARAMS)


def ident(tmp_path: Path, name: str) -> Identity:
    return Identity.load_or_create(tmp_path / name)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store(tmp_path / "store", size_cap=64 << 20)
    yield s
    s.close()


def keyed(share: bool = True, tokens: list[int] = PROMPT, key: str = KEY) -> Keyed:
    return Keyed(Request(prompt="q", params=PARAMS, share=share), list(tokens), key, MH)


# -- selection ------------------------------------------------------------------------------


def test_providers_ranked_by_reputation_then_expected_time(tmp_path: Path, store: Store) -> None:
    rep = Reputation(store.env)
    me = ident(tmp_path, "me").peer_id
    good, slow, fast, liar = (ident(tmp_path, n).peer_id for n in ("good", "slow", "fast", "liar"))
    for _ in range(5):
        rep.record_success(good, 100_000, 0.01, ttfb_s=0.2)  # reliable but 200 ms away
    rep.record_success(slow, 100_000, 1.0, ttfb_s=0.5)
    rep.record_success(fast, 100_000, 0.001, ttfb_s=0.001)
    for i in range(2):
        rep.record_verified_failure(liar, f"proof-{i}".encode(), "wrong")
    assert rep.is_banned(liar)
    provs = [Provider(p, (), 100_000, "00" * 32, 0.0) for p in (slow, liar, me, fast, good)]
    ranked = [p.peer_id for p in Selection(rep.get, me).ranked(provs)]
    # good has the best record; slow and fast tie on score (0.67), fast is quicker
    assert ranked == [good, fast, slow]


def test_near_ties_cost_nothing_at_the_honest_rate_and_ban_beyond_it(store: Store) -> None:
    """A near-tie divergence is not a lie: a peer with a few of them over many checked tokens
    keeps a fresh peer's score; one that diverges at nearly every answer's first tokens is
    penalised and banned, with no evidence."""
    rep = Reputation(store.env)
    for _ in range(20):  # an honest peer: 20 answers of 60 tokens accepted, then a near-tie
        rep.record_success("honest", 1000, 0.01, draft_tokens=60)
    rep.record_near_tie("honest", 30)
    rep.record_near_tie("honest", 30)
    honest = rep.get("honest")
    assert honest.excess_near_ties() == 0 and not honest.banned()
    assert honest.score() > PeerRecord("fresh").score()
    rep.record_near_tie("once", 5)  # a single one, from a new peer: unpunished
    assert rep.get("once").score() == PeerRecord("fresh").score()
    scores = []
    for _ in range(12):  # diverging at the 3rd token of every answer
        rec = rep.record_near_tie("liar", 3)
        scores.append(rec.score())
        if rec.banned():
            break
    assert rec.banned() and rec.failures == 0 and rec.evidence == []
    assert scores[-1] < scores[0] and len(scores) <= 8


# -- trust: the one mapping of fetch errors to reputation ---------------------------------------


def test_fetch_errors_map_to_reputation_once(tmp_path: Path, store: Store) -> None:
    rep = Reputation(store.env)
    trust = Trust(ident(tmp_path, "me"), MH, rep, verifier=None)
    assert trust.fetch_failed("p", NotFound("evicted")) is False
    assert trust.fetch_failed("p", Busy("4 streams")) is False
    assert rep.get("p").fetches == 0  # a stale advert or a busy peer says nothing against it
    assert trust.fetch_failed("p", BadResponse("bad signature")) is True
    assert rep.get("p").bad == pytest.approx(1, abs=1e-3)
    assert trust.fetch_failed("p", FetchTimeout("10 s")) is True
    assert trust.fetch_failed("p", FetchError("connection reset")) is True
    rec = rep.get("p")
    assert rec.timeouts == pytest.approx(2, abs=1e-3) and rec.fetches == 3


def test_conviction_keeps_the_proof_and_a_ban_reaches_the_other_parts(
    tmp_path: Path, store: Store
) -> None:
    rep = Reputation(store.env)
    me, liar = ident(tmp_path, "me"), ident(tmp_path, "liar")
    banned: list[str] = []
    trust = Trust(me, MH, rep, verifier=None, on_ban=(banned.append, banned.append))
    body = entry_to_wire(signed_entry(liar, KEY, MH, PARAMS))
    got = fetched(body, server=liar.peer_id)
    trio.run(
        trust.convict, liar.peer_id, "token 0 is not the local argmax", Proof(got, PROMPT, PARAMS)
    )
    rec = rep.get(liar.peer_id)
    assert rec.failures == pytest.approx(1, abs=1e-3) and len(rec.evidence) == 1 and not banned
    assert rep.evidence(rec.evidence[0]) is not None  # the signed proof, for anyone to re-check
    trio.run(trust.convict, liar.peer_id, "bad chunks")  # a KV lie: no proof to publish
    assert rep.is_banned(liar.peer_id) and banned == [liar.peer_id] * 2


# -- L2 -----------------------------------------------------------------------------------------


@dataclass
class L2:
    tier: PeerTier
    peers: FakePeers
    listings: FakeListings
    judge: FakeJudge
    verifier: FakeVerifier


def l2(store: Store, judge: FakeJudge | None = None, **config: object) -> L2:
    peers, listings, judge, verifier = (
        FakePeers(),
        FakeListings(),
        judge or FakeJudge(),
        FakeVerifier(),
    )
    from p2pcache.net.config import TierConfig

    me = Identity.load_or_create(store.path.parent / "me")
    tier = PeerTier(
        MH,
        store,
        me,
        peers=peers,
        listings=listings,
        judge=judge,
        ranking=Selection(judge.record, "me"),
        verifier=verifier,
        config=TierConfig(**config),
    )
    return L2(tier, peers, listings, judge, verifier)


def test_l2_fetches_verifies_stores_and_advertises_a_shared_answer(
    tmp_path: Path, store: Store
) -> None:
    t = l2(store)
    producer = ident(tmp_path, "producer")
    t.listings.offer(KEY, producer.peer_id)
    body = entry_to_wire(signed_entry(producer, KEY, MH, PARAMS))
    t.peers.answers[producer.peer_id] = fetched(body)
    answer = trio.run(t.tier.lookup, keyed(share=True))
    assert answer is not None and answer.cache_level == "L2" and answer.text == "xyz"
    assert (
        answer.tokens == [5, 6, 7]
        and answer.input_sha256 == KEY
        and answer.timings.prompt_tokens == 3
    )
    assert answer.peer is not None and answer.peer.peer == producer.peer_id and answer.peer.verified
    assert answer.peer.bytes == len(body) and answer.peer.verify_ms == 2.0
    stored = store.get(KEY)
    assert (
        stored is not None
        and stored.verified_by_us
        and not stored.privacy_flag
        and stored.prompt_tokens == 3
    )
    assert [e.input_sha256 for e in t.listings.advertised] == [KEY]
    assert t.judge.successes == [producer.peer_id] and t.tier.stats["hits"] == 1
    # A private request stores the answer privately and advertises nothing.
    store.delete(KEY)
    private = trio.run(t.tier.lookup, keyed(share=False))
    assert private is not None and store.get(KEY).privacy_flag and len(t.listings.advertised) == 1


def bad_first_then_honest(tmp_path: Path, store: Store, name: str) -> tuple[L2, Identity, Identity]:
    """Two providers of KEY, each serving its own signed entry: ``name`` (whose so far better
    record puts it first) and an honest one. The test says how the first one misbehaves."""
    bad, honest = ident(tmp_path, name), ident(tmp_path, "honest")
    t = l2(store, FakeJudge(records=lambda p: PeerRecord(p, successes=3.0 * (p == bad.peer_id))))
    t.listings.offer(KEY, honest.peer_id, bad.peer_id)
    for who in (bad, honest):
        t.peers.answers[who.peer_id] = fetched(entry_to_wire(signed_entry(who, KEY, MH, PARAMS)))
    return t, bad, honest


def test_l2_a_wrong_answer_is_proven_and_the_client_gets_the_local_answer(
    tmp_path: Path, store: Store
) -> None:
    t, liar, _honest = bad_first_then_honest(tmp_path, store, "liar")
    t.verifier.liars.add(liar.peer_id)
    answer = trio.run(t.tier.lookup, keyed(share=True))
    # Diverged at token 0: nothing of the draft was kept, the answer is the local model's.
    assert answer is not None and answer.tokens == LOCAL_TOKENS and answer.cache_level == "L3"
    assert answer.timings.accepted_tokens == 0 and answer.timings.local_tokens == 2
    ((pid, reason, proof),) = t.judge.convicted
    assert pid == liar.peer_id and "token 0" in reason
    assert proof is not None and list(proof.prompt) == PROMPT and proof.params == PARAMS
    assert t.tier.stats["verified_failures"] == 1 and t.judge.successes == []
    assert t.verifier.checked == [liar.peer_id]
    # What is stored (and advertised) is this node's own answer, under its own signature.
    stored = store.get(KEY)
    assert stored is not None and stored.output.tokens == LOCAL_TOKENS
    assert stored.producer == t.tier.identity.peer_id
    assert verify_by_peer(stored.producer, stored.signature, stored.signing_payload())
    assert [e.input_sha256 for e in t.listings.advertised] == [KEY]


def test_l2_a_near_tie_is_counted_not_convicted(tmp_path: Path, store: Store) -> None:
    peer = ident(tmp_path, "peer")
    t = l2(store)
    t.listings.offer(KEY, peer.peer_id)
    t.verifier.near_ties.add(peer.peer_id)
    t.peers.answers[peer.peer_id] = fetched(entry_to_wire(signed_entry(peer, KEY, MH, PARAMS)))
    answer = trio.run(t.tier.lookup, keyed())
    assert answer is not None and answer.tokens == LOCAL_TOKENS
    assert t.judge.convicted == [] and t.judge.near_ties == [(peer.peer_id, 1)]


def test_l2_a_malformed_answer_is_proven_and_the_next_provider_answers(
    tmp_path: Path, store: Store
) -> None:
    t, forger, honest = bad_first_then_honest(tmp_path, store, "forger")
    t.verifier.malformed.add(forger.peer_id)
    answer = trio.run(t.tier.lookup, keyed())
    assert answer is not None and answer.peer is not None and answer.peer.peer == honest.peer_id
    assert answer.cache_level == "L2" and answer.timings.accepted_tokens == 3
    ((pid, _reason, _proof),) = t.judge.convicted
    assert pid == forger.peer_id and t.judge.successes == [honest.peer_id]


def test_l2_fetch_errors_fall_through_and_stale_ads_are_forgotten(
    tmp_path: Path, store: Store
) -> None:
    t = l2(store)
    stale, broken, slow = "stale", "broken", "slow"
    t.listings.offer(KEY, stale, broken, slow)
    t.peers.answers = {
        stale: NotFound("evicted"),
        broken: fetched(b"not an entry"),
        slow: FetchTimeout("10 s"),
    }
    assert trio.run(t.tier.lookup, keyed()) is None  # L3 computes it
    assert t.listings.forgotten == [(KEY, stale, "decoder_final")]
    assert sorted(t.judge.failures) == [
        (broken, "BadResponse"),
        (slow, "FetchTimeout"),
        (stale, "NotFound"),
    ]
    assert t.tier.stats["fetch_failures"] == 2 and t.tier.stats["misses"] == 1
    assert store.get(KEY) is None and not t.verifier.checked


def test_l2_passes_when_stopped_for_another_model_or_when_fetching_does_not_pay(
    store: Store,
) -> None:
    far = FakeJudge(records=lambda p: PeerRecord(p, latency_ms=900.0, bandwidth=1e6))
    t = l2(store, far)
    t.listings.offer(KEY, "far")
    assert trio.run(t.tier.lookup, keyed()) is None  # 0.9 s away: computing 8 tokens is faster
    assert t.tier.stats["skipped_by_cost"] == 1 and not t.peers.asked
    t = l2(store, far, cost_model=False)
    t.listings.offer(KEY, "far")
    trio.run(t.tier.lookup, keyed())
    assert [p for p, _ in t.peers.asked] == ["far"]  # benchmarks of the fetch path always ask
    t.peers.running = False
    assert trio.run(t.tier.lookup, keyed()) is None and len(t.peers.asked) == 1
    t.peers.running = True
    other = Keyed(Request(prompt="q", params=PARAMS), PROMPT, KEY, "cd" * 32)
    assert trio.run(t.tier.lookup, other) is None and len(t.peers.asked) == 1


# -- the KV tier -------------------------------------------------------------------------------

C = 4  # tokens per chunk
CHUNK_BYTES = 100


@dataclass
class _Backend:  # what the KV tier reads of a LlamaBackend
    config: BackendConfig


@dataclass
class _Kv:  # what the KV tier reads of a KvPrefixCache
    chunks: KvChunkStore
    config: KvConfig
    policy: KvPolicy
    chunk_bytes: int
    backend: _Backend


@dataclass
class KvT:
    tier: KvPeerTier
    kv: _Kv
    peers: FakePeers
    listings: FakeListings
    judge: FakeJudge
    checker: FakeSpotChecker


def kv_tier(
    store: Store, judge: FakeJudge | None = None, ranking: Selection | None = None, **config: object
) -> KvT:
    cfg = KvConfig(MH, C, "f16", "f16", False, 512, 0, ())
    kv = _Kv(
        KvChunkStore(store),
        cfg,
        KvPolicy(chunk_tokens=C),
        CHUNK_BYTES,
        _Backend(BackendConfig(model_path=Path("model.gguf"), n_ctx=64)),
    )
    peers, listings, judge, checker = (
        FakePeers(),
        FakeListings(),
        judge or FakeJudge(),
        FakeSpotChecker(),
    )
    tier = KvPeerTier(
        kv,
        MH,
        peers=peers,
        listings=listings,
        judge=judge,  # type: ignore[arg-type]
        ranking=ranking or Selection(judge.record, "me"),
        checker=checker,
        config=KvNetConfig(**config),
    )  # type: ignore[arg-type]
    return KvT(tier, kv, peers, listings, judge, checker)


def test_kv_fetch_only_from_peers_above_the_score_threshold(tmp_path: Path, store: Store) -> None:
    rep = Reputation(store.env)
    rep.record_verified_failure("liar", None, "bad chunks")  # score 0.2
    rep.record_timeout("slow")  # 0.33
    rep.record_success("good", 1 << 20, 0.01)  # 0.67
    judge = FakeJudge(records=rep.get)
    provs = [Provider(p, (), 100, "00" * 32, 0.0) for p in ("liar", "slow", "new", "good", "me")]
    for min_score, want in (
        (0.4, ["good", "new"]),
        (0.3, ["good", "new", "slow"]),
        (0.6, ["good"]),
    ):
        tier = kv_tier(store, judge, Selection(rep.get, "me"), min_score=min_score).tier
        assert [p.peer_id for p in tier._eligible(provs)] == want


def _offer_chunks(t: KvT, tokens: list[int], peer: str = "good") -> list[bytes]:
    """``peer`` advertises the prompt's restorable chunks and serves them."""
    hashes = chunk_hashes(t.kv.config, tokens, (len(tokens) - 1) // C)
    t.listings.offer(hashes[-1].hex(), peer, level="kv_prefix", size=len(hashes) * CHUNK_BYTES)
    payloads = [bytes([i]) * CHUNK_BYTES for i in range(len(hashes))]
    t.peers.answers[peer] = fetched(encode_body(hashes, payloads))
    return hashes


def test_kv_prefetch_stores_a_peers_chunks_and_spot_checks_them(store: Store) -> None:
    t = kv_tier(store, spot_check_rate=1.0)
    tokens = list(range(100, 113))  # 13 tokens: 3 chunks a restore may use
    hashes = _offer_chunks(t, tokens)
    got = trio.run(t.tier.prefetch, keyed(tokens=tokens))
    assert got is not None and got.peer == "good" and (got.first, got.end) == (0, 3)
    assert got.spot_checked and got.spot_check_diff == 0.0 and not got.dropped
    ((_, req),) = t.peers.asked
    assert req.level == "kv_prefix" and req.range == (0, 3) and req.chunks == tuple(hashes)
    assert t.kv.chunks.present(hashes) == [True] * 3 and t.checker.checked == [3]
    assert (
        t.judge.successes == ["good"]
        and t.tier.stats["fetches"] == 1
        and t.tier.stats["chunks_fetched"] == 3
    )
    # After the run: what the peer's chunks gave, and the shared prompt's chunks advertised.
    gen = Generation([7], "a", "stop", prompt_tokens=13, prefill_ms=1.0, decode_ms=1.0)
    details = trio.run(
        t.tier.after_generate,
        keyed(tokens=tokens),
        PrefixGeneration(gen, cached_tokens=12, restore_ms=0.1, pending=PendingChunks()),
        got,
    )
    assert (
        details is not None
        and details.peer == "good"
        and details.tokens == 12
        and not details.rejected
    )
    assert [a.key for a in t.listings.ads] == [h.hex() for h in hashes]
    assert [a.size for a in t.listings.ads] == [CHUNK_BYTES, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES]
    assert {a.output_sha256 for a in t.listings.ads} == {t.kv.config.digest().hex()}
    assert t.tier.stats["chunks_advertised"] == 3


def test_kv_chunks_failing_the_spot_check_are_dropped_and_the_peer_convicted(store: Store) -> None:
    t = kv_tier(store, spot_check_rate=1.0)
    t.checker.diff = 9.0
    tokens = list(range(200, 213))
    hashes = _offer_chunks(t, tokens)
    got = trio.run(t.tier.prefetch, keyed(tokens=tokens))
    assert got is not None and got.dropped and got.spot_check_diff == 9.0
    assert t.kv.chunks.present(hashes) == [False] * 3  # the request prefills locally
    ((pid, reason, proof),) = t.judge.convicted
    assert pid == "good" and "spot-check" in reason and proof is None
    assert t.judge.successes == [] and t.tier.stats["spot_check_failures"] == 1


def test_kv_fetch_failures_and_stale_ads(store: Store) -> None:
    t = kv_tier(store)
    tokens = list(range(300, 313))
    hashes = _offer_chunks(t, tokens)
    t.peers.answers["good"] = fetched(b"short")  # not 3 chunks: a bad response
    assert trio.run(t.tier.prefetch, keyed(tokens=tokens)) is None
    assert t.judge.failures == [("good", "BadResponse")] and t.tier.stats["fetch_failures"] == 1
    t.peers.answers["good"] = NotFound("evicted")
    assert trio.run(t.tier.prefetch, keyed(tokens=tokens)) is None
    assert t.listings.forgotten == [(hashes[-1].hex(), "good", "kv_prefix")]
    assert t.tier.stats["fetch_failures"] == 1 and t.kv.chunks.present(hashes) == [False] * 3
