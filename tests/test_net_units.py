"""Pure pieces of p2pcache.net: identity mapping, adverts, evidence, reputation (real LMDB)."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.ads import (
    AdEntry,
    AdRejected,
    AdValidator,
    GossipIndex,
    ads_topic,
    decode_advert,
    make_advert,
)
from p2pcache.net.evidence import EvidenceRejected, decode_evidence, make_evidence
from p2pcache.net.fetch import FetchRequest, ResponseHeader, entry_from_wire, entry_to_wire
from p2pcache.net.host import key_pair_from_identity, parse_psk
from p2pcache.net.peer_keys import public_key_of
from p2pcache.net.reputation import Reputation, ReputationConfig
from p2pcache.net.warm import WarmConfig, WarmConnections
from p2pcache.net.wire import WireError
from p2pcache.store import Entry, Output, Store
from tests._entries import signed_response

MH = "ab" * 32


def ident(tmp_path: Path, name: str = "k") -> Identity:
    return Identity.load_or_create(tmp_path / name)


def test_libp2p_key_matches_identity(tmp_path: Path) -> None:
    i = ident(tmp_path)
    from libp2p.peer.id import ID

    kp = key_pair_from_identity(i)
    assert ID.from_pubkey(kp.public_key).to_base58() == i.peer_id
    assert public_key_of(i.peer_id) == i.public_bytes
    # the same file gives the same peer id after a "restart"
    assert Identity.load_or_create(tmp_path / "k").peer_id == i.peer_id


def test_psk_parsing() -> None:
    assert parse_psk(None) is None
    assert parse_psk("ab" * 32) == "ab" * 32
    assert parse_psk(b"\x01" * 32) == "01" * 32
    for bad in ("xyz", "ab" * 31, b"short"):
        with pytest.raises(ValueError):
            parse_psk(bad)  # type: ignore[arg-type]


def _validator(tmp_path: Path, **kw: object) -> tuple[AdValidator, Identity]:
    me = ident(tmp_path, "me")
    return AdValidator(MH, GossipIndex(), me.peer_id, **kw), ident(tmp_path, "them")  # type: ignore[arg-type]


def test_advert_roundtrip_and_index(tmp_path: Path) -> None:
    v, them = _validator(tmp_path)
    ad = make_advert(
        them, MH, ["/ip4/127.0.0.1/tcp/1"], 5, [AdEntry("decoder_final", "01" * 32, 10, "02" * 32)]
    )
    got = v.check(ad.encode(), them.peer_id, ads_topic(MH))
    v.accept(got)
    assert [p.peer_id for p in v.index.providers("01" * 32)] == [them.peer_id]


def test_advert_rejections(tmp_path: Path) -> None:
    v, them = _validator(tmp_path)
    e = [AdEntry("decoder_final", "01" * 32, 10, "02" * 32)]
    good = make_advert(them, MH, [], 10, e)
    cases = {
        "wrong-model": make_advert(them, "cd" * 32, [], 11, e).encode(),
        "stale": make_advert(them, MH, [], 12, e, ts=int(time.time() * 1000) - 3_600_000).encode(),
        "bad-signature": msgpack.packb({**msgpack.unpackb(good.encode()), "seq": 99}),
        "malformed": b"\x93not a map",
        "oversize": b"\x00" * (70 * 1024),
    }
    for reason, data in cases.items():
        with pytest.raises(AdRejected, match=reason):
            v.check(data, them.peer_id)
    with pytest.raises(AdRejected, match="unsigned"):  # producer is not the pubsub origin
        v.check(good.encode(), ident(tmp_path, "other").peer_id)
    with pytest.raises(AdRejected, match="wrong-model"):
        v.check(good.encode(), them.peer_id, ads_topic("cd" * 32))
    v.accept(v.check(good.encode(), them.peer_id))
    with pytest.raises(AdRejected, match="replay"):
        v.check(good.encode(), them.peer_id)
    with pytest.raises(AdRejected, match="replay"):
        v.check(make_advert(them, MH, [], 9, e).encode(), them.peer_id)
    banned = AdValidator(MH, GossipIndex(), "x", is_banned=lambda p: True)
    with pytest.raises(AdRejected, match="banned"):
        banned.check(make_advert(them, MH, [], 1, e).encode(), them.peer_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_advert_decoder_never_crashes(data: bytes) -> None:
    try:
        decode_advert(data)
    except AdRejected:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "key", "model_hash", "level", "range", "max_bytes"]),
        st.one_of(
            st.integers(), st.text(max_size=70), st.none(), st.lists(st.integers(), max_size=3)
        ),
    )
)
def test_fetch_request_parser_rejects_cleanly(m: dict) -> None:
    try:
        FetchRequest.from_msg(m)
    except WireError:
        pass


def _entry(i: Identity, prompt: list[int], params: SamplingParams) -> Entry:
    e = Entry(
        input_sha256=input_sha256(MH, prompt, params),
        model_hash=MH,
        cache_level="decoder_final",
        output=Output([5, 6, 7], "xyz"),
        params=params.to_dict(),
        privacy_flag=False,
        producer=i.peer_id,
    )
    e.signature = i.sign(e.signing_payload())
    return e


def test_evidence_static_checks(tmp_path: Path) -> None:
    liar, accuser = ident(tmp_path, "liar"), ident(tmp_path, "acc")
    params = SamplingParams(max_tokens=8)
    prompt = [2, 10, 11]
    e = _entry(liar, prompt, params)
    body = entry_to_wire(e)
    import hashlib

    h = ResponseHeader(
        e.input_sha256,
        MH,
        "decoder_final",
        None,
        len(body),
        hashlib.sha256(body).hexdigest(),
        accuser.peer_id,
        liar.peer_id,
        1,
    )
    h = ResponseHeader(**{**h.__dict__, "sig": liar.sign(h.payload())})
    ev = make_evidence(accuser, h, body, prompt, params, "token 2 is not the argmax")
    got = decode_evidence(ev.encode(), MH)
    assert got.liar == liar.peer_id and got.entry().output.tokens == [5, 6, 7]
    with pytest.raises(EvidenceRejected, match="wrong-model"):
        decode_evidence(ev.encode(), "cd" * 32)
    forged = make_evidence(
        accuser, h, body, [2, 10, 12], params, "x"
    )  # prompt not matching the key
    with pytest.raises(EvidenceRejected, match="key"):
        decode_evidence(forged.encode(), MH)
    tampered = make_evidence(accuser, h, body.replace(b"xyz", b"xyw"), prompt, params, "x")
    with pytest.raises(EvidenceRejected, match="body"):
        decode_evidence(tampered.encode(), MH)
    d = msgpack.unpackb(ev.encode(), raw=False)
    d["reason"] = "changed"
    with pytest.raises(EvidenceRejected, match="accuser"):
        decode_evidence(msgpack.packb(d, use_bin_type=True), MH)
    assert entry_from_wire(body).producer == liar.peer_id


def test_reputation_in_store_env(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", size_cap=64 << 20)
    try:
        rep = Reputation(store.env, ReputationConfig(half_life_s=3600))
        p = "12D3KooWpeer"
        assert rep.score(p) == 0.5 and not rep.is_banned(p)
        rep.record_success(p, 1000, 0.01)
        s1 = rep.score(p)
        assert s1 > 0.5
        rep.record_verified_failure(p, b"proof-1", "wrong token")
        assert rep.score(p) < s1 and not rep.is_banned(p)
        rep.record_verified_failure(p, b"proof-1", "same proof again")  # counted once
        assert rep.get(p).failures == pytest.approx(1.0, abs=1e-3)
        for i in range(2, 5):
            rep.record_verified_failure(p, f"proof-{i}".encode(), "wrong token")
        rec = rep.get(p)
        assert rec.banned() and rec.failures > 3 and len(rec.evidence) == 4
        assert rep.gossip_score(p) == -1000.0
        assert rep.evidence(rec.evidence[0]) == b"proof-1"
        # decay: an hour later (one half-life) the counters halve
        rec_t = rep.get(p)
        rep._decay(rec_t, rec_t.updated_at + 3_600_000)
        assert rec_t.failures == pytest.approx(rec.failures / 2, rel=1e-3)
    finally:
        store.close()
    # persisted in the same LMDB environment as the entries
    store = Store(tmp_path / "store", size_cap=64 << 20)
    try:
        assert Reputation(store.env).is_banned("12D3KooWpeer")
        assert store.stats().entries == 0
    finally:
        store.close()


def test_cost_model_fetch_or_recompute() -> None:
    from p2pcache.net.reputation import PeerRecord
    from p2pcache.net.selection import CostModel

    cm = CostModel(prefill_tps=700.0, decode_tps=80.0)
    fast = PeerRecord("p", latency_ms=2.0, bandwidth=100e6)
    far = PeerRecord("q", latency_ms=900.0, bandwidth=1e6)
    # 256 output tokens: fetch (ms) + one prefill beats 3.2 s of decoding
    assert cm.decoder_final_pays(100, 256, 2_000, fast)
    # a peer 0.9 s away does not pay for a 4-token answer (4 / 80 tok/s = 50 ms to compute)
    assert not cm.decoder_final_pays(10, 4, 200, far)
    # KV state, the docs' break-even: 2,000 tokens x 18.5 KB = 37 MB vs ~2.9 s of prefill
    state = 2_000 * 18_500
    assert cm.kv_prefix_pays(state, 2_000, PeerRecord("r", latency_ms=5, bandwidth=100e6))
    assert not cm.kv_prefix_pays(state, 2_000, PeerRecord("s", latency_ms=5, bandwidth=4e6))
    # the node's own measured prefill speed moves the break-even (a GPU prefills far faster)
    for _ in range(30):
        cm.observe_prefill(50_000, 1.0)
    assert cm.prefill_tps > 40_000
    assert not cm.kv_prefix_pays(state, 2_000, PeerRecord("r", latency_ms=5, bandwidth=100e6))


def _signed_lie(
    liar: Identity, accuser: Identity
) -> tuple[ResponseHeader, bytes, list[int], SamplingParams]:
    params = SamplingParams(max_tokens=8)
    prompt = [2, 10, 11]
    key = input_sha256(MH, prompt, params)
    header, body = signed_response(liar, accuser, key, _entry(liar, prompt, params))
    return header, body, prompt, params


def test_reputation_cli_reads_a_stopped_nodes_store(tmp_path: Path) -> None:
    import json as _json

    from typer.testing import CliRunner

    from p2pcache.cli.main import app

    liar_dir, acc_dir = tmp_path / "liar", tmp_path / "node"
    liar = ident(liar_dir, "identity.key")
    accuser = ident(acc_dir, "identity.key")
    header, body, prompt, params = _signed_lie(liar, accuser)
    ev = make_evidence(accuser, header, body, prompt, params, "token 0 is not the local argmax")
    store = Store(acc_dir / "store", size_cap=64 << 20)
    try:
        rep = Reputation(store.env)
        rep.record_verified_failure(liar.peer_id, ev.encode(), ev.reason)
        rep.record_success(ident(tmp_path, "other").peer_id, 500, 0.01)
    finally:
        store.close()
    runner = CliRunner()
    r = runner.invoke(app, ["reputation", "--data-dir", str(acc_dir), "--json"])
    assert r.exit_code == 0, r.output
    doc = _json.loads(r.output)
    assert doc["peer_id"] == accuser.peer_id and len(doc["peers"]) == 2
    r = runner.invoke(app, ["reputation", liar.peer_id, "--data-dir", str(acc_dir), "--json"])
    assert r.exit_code == 0, r.output
    (row,) = _json.loads(r.output)["peers"]
    assert row["failures"] == pytest.approx(1, abs=1e-3) and row["score"] < 0.5
    (detail,) = row["evidence_detail"]
    assert (
        detail["accuser"] == accuser.peer_id
        and detail["liar"] == liar.peer_id
        and "argmax" in detail["reason"]
    )
    r = runner.invoke(app, ["peers", "--data-dir", str(acc_dir)])
    assert r.exit_code == 0 and "not running" in r.output
    r = runner.invoke(
        app, ["reputation", ident(tmp_path, "stranger").peer_id, "--data-dir", str(acc_dir)]
    )
    assert r.exit_code == 1  # no record of that peer: a clear error
    r = runner.invoke(app, ["reputation", "--data-dir", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no store" in r.output


def _warm(
    connected: set[str],
    scores: dict[str, float],
    banned: set[str] = frozenset(),
    max_peers: int = 3,
    retry_s: float = 300.0,
    dial=None,
) -> WarmConnections:
    async def no_dial(_p: str, _a: object, _t: float) -> None:
        raise AssertionError("not expected to dial")

    return WarmConnections(
        WarmConfig(max_peers=max_peers, retry_s=retry_s, concurrency=2),
        "me",
        connected=lambda: set(connected),
        dial=dial or no_dial,
        score=lambda p: scores.get(p, 0.5),
        is_banned=lambda p: p in banned,
    )


def test_warm_candidates_are_bounded_ranked_and_exclude_the_wrong_peers() -> None:
    addrs = ("/ip4/127.0.0.1/tcp/1",)
    producers = {p: addrs for p in ("me", "a", "b", "c", "d", "banned", "conn")}
    producers["noaddr"] = ()
    w = _warm({"conn"}, {"a": 0.9, "b": 0.2, "c": 0.7, "d": 0.5, "banned": 1.0}, banned={"banned"})
    # 3 warm at most, one producer ("conn") already connected: two dials, best scores first.
    assert w.candidates(producers, now=1000.0) == ["a", "c"]
    # Off entirely with max_peers 0.
    assert _warm(set(), {}, max_peers=0).candidates(producers, now=1000.0) == []
    # One attempt per producer per retry_s.
    w._tried.update({"a": 900.0, "c": 500.0})
    assert w.candidates(producers, now=1000.0) == ["c", "d"]


def test_warm_run_dials_new_producers_once_and_reports_failures() -> None:
    import trio
    import trio.testing

    dialled: list[str] = []
    connected: set[str] = set()
    done = trio.Event()

    async def dial(peer: str, addrs: object, _t: float) -> None:
        dialled.append(peer)
        if peer == "down":
            raise OSError("refused")
        connected.add(peer)

    w = _warm(connected, {"up": 0.9, "down": 0.1}, dial=dial)
    state = {"event": trio.Event(), "producers": {}}

    def change(producers: dict) -> None:
        state["producers"] = producers
        ev, state["event"] = state["event"], trio.Event()
        ev.set()

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(w.run, lambda: state["event"], lambda: state["producers"])
                await trio.testing.wait_all_tasks_blocked()
                addrs = ("/ip4/127.0.0.1/tcp/1",)
                change({"up": addrs, "down": addrs})
                await trio.testing.wait_all_tasks_blocked()
                await w.wait_inflight("up", 5)
                change({"up": addrs, "down": addrs})  # a later advert: nobody is dialled again
                await trio.testing.wait_all_tasks_blocked()
                done.set()
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert done.is_set()
    assert sorted(dialled) == ["down", "up"]
    assert w.stats == {"dialled": 1, "failed": 1} and not w._inflight


def test_index_keeps_the_addresses_of_a_bounded_number_of_producers(tmp_path: Path) -> None:
    index = GossipIndex(max_producers=2)
    ids = [ident(tmp_path, f"p{i}") for i in range(3)]
    for seq, who in enumerate(ids + [ids[0]]):  # p0 heard again last: p1 is the oldest
        index.add(
            make_advert(
                who,
                MH,
                [f"/ip4/127.0.0.1/tcp/{seq + 1}"],
                seq + 1,
                [AdEntry("decoder_final", f"{seq:064x}", 10, "02" * 32)],
            )
        )
    assert list(index.addrs) == [ids[2].peer_id, ids[0].peer_id]
    assert index.addrs[ids[0].peer_id] == ("/ip4/127.0.0.1/tcp/4",)
