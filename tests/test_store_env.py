"""The LMDB environment's owner: its database registry, counters, frames, close hooks, the
on-disk format its tenants share, and reputation written behind the in-memory view."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lmdb
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcache.errors import CorruptValue, DuplicateDatabase, MissingDatabase, UnknownDatabase
from p2pcache.kv.chunk_store import KvChunkStore, NewChunk
from p2pcache.net.reputation import SCHEMA as REP_SCHEMA
from p2pcache.net.reputation import PeerRecord, Reputation, ReputationConfig, read_offline
from p2pcache.store import Store
from p2pcache.store.lmdb_env import (
    MAX_DBS,
    Counters,
    LmdbEnv,
    Schema,
    decode_frame,
    encode_frame,
    pack_u64,
)
from p2pcache.store.records import encode_entry
from tests._entries import make_entry

ROOT = Path(__file__).resolve().parent.parent
SLOW_DECAY = ReputationConfig(half_life_s=1e12)  # counters compare exactly across a reopen


# -- the registry -----------------------------------------------------------------------------
def test_unknown_database_name_is_refused(tmp_path: Path) -> None:
    with LmdbEnv(tmp_path / "env", map_size=1 << 24) as env:
        dbs = env.open(Schema("a", ("a_one", "a_two")))
        assert dbs["a_one"] is not None
        with pytest.raises(UnknownDatabase, match="a_three"):
            dbs["a_three"]


def test_duplicate_database_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DuplicateDatabase):
        Schema("a", ("x", "x"))
    with LmdbEnv(tmp_path / "env", map_size=1 << 24) as env:
        first = env.open(Schema("a", ("shared_name", "a_only")))
        with pytest.raises(DuplicateDatabase, match="belongs to a"):
            env.open(Schema("b", ("b_only", "shared_name")))
        with pytest.raises(DuplicateDatabase):
            env.open(Schema("a", ("a_only",)))  # one tenant, two layouts
        # the same tenant again (two views of one store) gets the same handles
        assert env.open(Schema("a", ("shared_name", "a_only"))) is first
        # the refused tenant claimed nothing: its other name is still free
        env.open(Schema("c", ("b_only",)))


def test_the_tenants_of_one_store_never_collide(tmp_path: Path) -> None:
    with Store(tmp_path / "store", size_cap=1 << 24) as store:
        KvChunkStore(store)
        KvChunkStore(store)  # a second view of the same chunks is fine
        Reputation(store.env)
        with pytest.raises(DuplicateDatabase):
            store.env.open(Schema("intruder", ("entries",)))
        with pytest.raises(DuplicateDatabase):
            store.env.open(Schema("intruder", ("rep_peers",)))


def test_readonly_env_reports_missing_databases(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LmdbEnv.open_readonly(tmp_path / "nothing")
    Store(tmp_path / "store").close()  # no reputation databases yet
    with LmdbEnv.open_readonly(tmp_path / "store") as env:
        with pytest.raises(MissingDatabase):
            env.open(REP_SCHEMA)
    assert read_offline(tmp_path / "store") == ([], {})


def test_close_flushes_tenants_weakly_and_despite_failures(tmp_path: Path) -> None:
    calls: list[str] = []

    class Tenant:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def flush(self) -> None:
            calls.append(self.name)
            if self.fail:
                raise RuntimeError("disk on fire")

    env = LmdbEnv(tmp_path / "env", map_size=1 << 24)
    kept, failing, gone = Tenant("kept"), Tenant("failing", fail=True), Tenant("gone")
    for t in (failing, gone, kept):
        env.on_close(t.flush)
    del gone
    gc.collect()
    env.close()
    env.close()  # twice is harmless
    assert calls == ["failing", "kept"] and env.closed


# -- counters and frames ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-1000, 1000), max_size=30))
def test_counters_add_clamped_at_zero(deltas: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d, LmdbEnv(d, map_size=1 << 24, durable=False) as env:
        c = Counters(env.open(Schema("t", ("t_meta",)))["t_meta"])
        want = 0
        for delta in deltas:
            with env.begin(write=True) as txn:
                c.add(txn, "n", delta)
            want = max(0, want + delta)
            with env.begin() as txn:
                assert c.get(txn, "n") == want
        with env.begin() as txn:
            raw = txn.get(b"n", db=c.db)
            assert c.read(txn, ["n", "never"]) == {"n": want, "never": 0}
        if not any(deltas):
            assert raw is None  # a zero delta writes nothing
        else:
            assert bytes(raw) == pack_u64(want) == want.to_bytes(8, "little")


def test_big_endian_counters(tmp_path: Path) -> None:
    with LmdbEnv(tmp_path / "env", map_size=1 << 24) as env:
        c = Counters(env.open(Schema("t", ("ids",)))["ids"], byteorder="big")
        with env.begin(write=True) as txn:
            c.set(txn, b"next", 5)
            c.add(txn, b"next", 2)
        with env.begin() as txn:
            assert c.get(txn, b"next") == 7
            assert txn.get(b"next", db=c.db) == (7).to_bytes(8, "big")


@given(st.binary(max_size=200), st.data())
def test_frames_roundtrip_and_catch_any_flipped_byte(payload: bytes, data: st.DataObject) -> None:
    framed = encode_frame(payload)
    assert decode_frame(framed) == payload and decode_frame(memoryview(framed)) == payload
    i = data.draw(st.integers(0, len(framed) - 1))
    bad = bytearray(framed)
    bad[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptValue):
        decode_frame(bytes(bad))


# -- the on-disk format -----------------------------------------------------------------------
def test_a_data_dir_written_the_old_way_opens(tmp_path: Path) -> None:
    """Bytes as the modules wrote them before the environment had an owner (each opening its
    own named databases in an env opened with max_dbs=16)."""
    path = tmp_path / "store"
    path.mkdir()
    entry = make_entry(7)
    k = bytes.fromhex(entry.input_sha256)
    value = encode_entry(entry)
    chunk_hash = hashlib.sha256(b"chunk").digest()
    peer = PeerRecord("12D3KooWold", successes=3.0, fetches=4, bytes_in=99, evidence=["ab" * 32])
    env = lmdb.open(str(path), map_size=1 << 26, max_dbs=16)
    with env.begin(write=True) as txn:
        entries, evict, meta = (env.open_db(n, txn=txn) for n in (b"entries", b"evict", b"meta"))
        txn.put(k, value, db=entries)
        txn.put((1).to_bytes(8, "big") + k, b"", db=evict)
        txn.put(b"entries", (1).to_bytes(8, "little"), db=meta)
        txn.put(b"bytes", len(value).to_bytes(8, "little"), db=meta)
        txn.put(b"hits", (41).to_bytes(8, "little"), db=meta)
        kv_meta = env.open_db(b"kv_meta", txn=txn)
        txn.put(b"evictions", (3).to_bytes(8, "little"), db=kv_meta)
        kv_use = env.open_db(b"kv_use", txn=txn)
        txn.put(chunk_hash, (1234).to_bytes(8, "little"), db=kv_use)  # oldest form: no depth
        peers, ev = env.open_db(b"rep_peers", txn=txn), env.open_db(b"rep_evidence", txn=txn)
        from dataclasses import asdict

        txn.put(peer.peer_id.encode(), msgpack.packb(asdict(peer), use_bin_type=True), db=peers)
        txn.put(bytes.fromhex("ab" * 32), b"the proof", db=ev)
    env.close()

    with Store(path) as store:
        got = store.get(entry.input_sha256)
        assert got is not None and got.output == entry.output
        s = store.stats()
        assert (s.entries, s.bytes, s.hits) == (1, len(value), 41)
        kv = KvChunkStore(store)
        assert kv.stats().evictions == 3
        rep = Reputation(store.env, SLOW_DECAY)
        rec = rep.get("12D3KooWold")
        assert rec.fetches == 4 and rec.bytes_in == 99 and rec.successes == pytest.approx(3.0)
        assert rep.evidence("ab" * 32) == b"the proof"


def test_tenants_write_the_same_bytes_as_before(tmp_path: Path) -> None:
    path = tmp_path / "store"
    entry = make_entry(3)
    with Store(path, size_cap=1 << 24) as store:
        store.put(entry)
        kv = KvChunkStore(store)
        h = hashlib.sha256(b"c0").digest()
        kv.put_many([NewChunk(h, 0, 4, b"x" * 64)], 64, used_at=5000)
        rep = Reputation(store.env)
        rec = rep.record_verified_failure("p", b"proof", "lied")
        stored = store.get(entry.input_sha256)
    env = lmdb.open(str(path), readonly=True, max_dbs=16, lock=True)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            assert txn.get(b"entries", db=meta) == (1).to_bytes(8, "little")
            entries = env.open_db(b"entries", txn=txn, create=False)
            assert txn.get(bytes.fromhex(entry.input_sha256), db=entries) == encode_entry(stored)
            kv_meta = env.open_db(b"kv_meta", txn=txn, create=False)
            assert txn.get(b"chunks", db=kv_meta) == (1).to_bytes(8, "little")
            kv_use = env.open_db(b"kv_use", txn=txn, create=False)
            assert txn.get(h, db=kv_use) == (5000).to_bytes(8, "little") + (0).to_bytes(4, "little")
            peers = env.open_db(b"rep_peers", txn=txn, create=False)
            on_disk = msgpack.unpackb(txn.get(b"p", db=peers), raw=False)
            assert on_disk["failures"] == 1.0 and on_disk["evidence"] == rec.evidence
            evidence = env.open_db(b"rep_evidence", txn=txn, create=False)
            assert txn.get(hashlib.sha256(b"proof").digest(), db=evidence) == b"proof"
    finally:
        env.close()
    assert MAX_DBS == 16


# -- reputation: write-behind -----------------------------------------------------------------
def _on_disk(store: Store, peer_id: str) -> dict | None:
    peers = store.env.open(REP_SCHEMA)["rep_peers"]
    with store.env.begin(db=peers) as txn:
        raw = txn.get(peer_id.encode())
    return None if raw is None else msgpack.unpackb(raw, raw=False)


def test_a_change_is_visible_at_once_and_written_at_flush(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store(path) as store:
        rep = Reputation(store.env, SLOW_DECAY)
        rep.record_success("p", 1000, 0.01)
        rep.record_verified_failure("p", b"proof-1", "wrong token")
        assert rep.get("p").fetches == 1 and rep.get("p").failures == pytest.approx(1.0)
        assert rep.unflushed == 1 and _on_disk(store, "p") is None  # nothing written yet
        eid = rep.get("p").evidence[0]
        assert rep.evidence(eid) == b"proof-1"  # readable before it is written
        assert rep.flush() == 1 and rep.unflushed == 0
        assert _on_disk(store, "p")["fetches"] == 1
        assert rep.evidence(eid) == b"proof-1"  # ... and after
        assert rep.flush() == 0  # nothing changed since
        rep.record_timeout("p")  # left for close to write
    with Store(path) as store:
        rec = Reputation(store.env, SLOW_DECAY).get("p")
        assert rec.fetches == 2 and rec.timeouts == pytest.approx(1.0)
    records, evidence = read_offline(path)
    assert [r.peer_id for r in records] == ["p"] and evidence == {eid: b"proof-1"}


def test_reads_return_copies(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        rep = Reputation(store.env)
        rec = rep.record_success("p", 10, 0.01)
        rec.fetches = 1000
        rep.get("p").evidence.append("x")
        assert rep.get("p").fetches == 1 and rep.get("p").evidence == []
        assert rep.get("unknown").fetches == 0
        assert [r.peer_id for r in rep.all()] == ["p"]  # an unknown peer read is not stored


def test_a_failed_flush_keeps_the_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / "store") as store:
        rep = Reputation(store.env)
        rep.record_verified_failure("p", b"proof", "lied")
        real_begin = store.env.begin

        def full(*, write: bool = False, **kw: object) -> lmdb.Transaction:
            if write:
                raise lmdb.MapFullError("map full")
            return real_begin(write=write, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(store.env, "begin", full)
        assert rep.flush() == 0 and rep.unflushed == 1
        monkeypatch.setattr(store.env, "begin", real_begin)
        assert rep.flush() == 1
        assert _on_disk(store, "p")["failures"] == 1.0
        assert rep.evidence(rep.get("p").evidence[0]) == b"proof"


def test_the_flusher_writes_off_the_loop_and_once_more_when_cancelled(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        rep = Reputation(store.env, ReputationConfig(flush_interval_s=0.05))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(rep.run)
                rep.record_success("p", 10, 0.01)
                for _ in range(500):  # the flusher's thread writes within a few intervals
                    if _on_disk(store, "p") is not None:
                        break
                    await trio.sleep(0.01)
                assert _on_disk(store, "p") is not None
                rep.record_success("q", 10, 0.01)
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert rep.unflushed == 0 and _on_disk(store, "q") is not None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["success", "timeout", "bad", "lie", "flush"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 3),
        ),
        max_size=25,
    )
)
def test_a_crash_loses_at_most_the_unflushed_changes(ops: list[tuple[str, str, int]]) -> None:
    """Model: what a fresh process reads equals the view at the last flush."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "store", durable=False)
        rep = Reputation(store.env, SLOW_DECAY)
        flushed: dict[str, PeerRecord] = {}
        for op, peer, n in ops:
            if op == "flush":
                rep.flush()
                flushed = {r.peer_id: r for r in rep.all()}
            elif op == "success":
                rep.record_success(peer, 100 * n, 0.01)
            elif op == "timeout":
                rep.record_timeout(peer)
            elif op == "bad":
                rep.record_bad(peer, "malformed")
            else:
                rep.record_verified_failure(peer, f"proof-{n}".encode(), "lied")
        # a crash: this instance is gone without a flush; a fresh one reads only LMDB
        del rep
        gc.collect()
        fresh = {r.peer_id: r for r in Reputation(store.env, SLOW_DECAY).all()}
        assert fresh.keys() == flushed.keys()
        for pid, want in flushed.items():
            got = fresh[pid]
            assert (got.fetches, got.bytes_in, got.evidence, got.banned_until) == (
                want.fetches,
                want.bytes_in,
                want.evidence,
                want.banned_until,
            )
            assert got.score() == pytest.approx(want.score())
        store.close()


WRITER = """
import sys
from p2pcache.net.reputation import Reputation
from p2pcache.store import Store
store = Store(sys.argv[1])
rep = Reputation(store.env)
for r in range(1, 100_000):
    for p in range(20):
        rep.record_success(f"peer-{p}", 100, 0.01)
    rep.flush()
    print(r, flush=True)
"""


def test_sigkill_during_flushes_never_corrupts(tmp_path: Path) -> None:
    path = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    flushed = 0
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            flushed = int(line)
            if flushed >= 60:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with Store(path) as store:
        peers = store.env.open(REP_SCHEMA)["rep_peers"]
        with store.env.begin(db=peers) as txn:
            raw = {bytes(k).decode(): msgpack.unpackb(v, raw=False) for k, v in txn.cursor()}
        assert len(raw) == 20
        rounds = {d["fetches"] for d in raw.values()}
        # one transaction per flush: every peer at the same round, at least the last reported
        assert len(rounds) == 1 and rounds.pop() >= flushed
