from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.store import EntryTooLarge, Output, Store
from p2pcache.store.records import Entry, decode_entry, encode_entry
from tests._entries import MODEL, make_entry


def test_roundtrip_with_full_schema(store: Store) -> None:
    e = make_entry(1)
    e.embedding = 42
    e.producer = "12D3KooWtest"
    e.signature = b"\x01" * 64
    store.put(e)
    got = store.get(e.input_sha256)
    assert got is not None
    assert got.output == e.output and got.embedding == 42 and got.signature == e.signature
    assert got.privacy_flag is True and got.verified_by_us is True and got.size > 0
    assert got.inserted_at > 0 and got.hits == 0


def test_unknown_and_malformed_keys(store: Store) -> None:
    assert store.get("00" * 32) is None
    with pytest.raises(KeyError):
        store.get("not-hex")
    with pytest.raises(KeyError):
        store.get("ab" * 31)


def test_hits_are_counted(store: Store) -> None:
    e = make_entry(2)
    store.put(e)
    for _ in range(3):
        assert store.get(e.input_sha256) is not None
        store.record_hit(e.input_sha256)
    store.record_miss()
    store.flush_hits()
    got = store.get(e.input_sha256)
    assert got is not None and got.hits == 3 and got.last_hit_at >= got.inserted_at
    s = store.stats()
    assert (s.hits, s.misses, s.entries, s.inserts) == (3, 1, 1, 1)


def test_corrupt_value_is_dropped_and_reported(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = make_entry(3), make_entry(4)
    store.put(good)
    store.put(bad)
    k = bytes.fromhex(bad.input_sha256)
    with store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(k, db=store._entries))
        raw[-5] ^= 0xFF  # one flipped bit pattern in the payload
        txn.put(k, bytes(raw), db=store._entries)
    with caplog.at_level(logging.ERROR):
        assert store.get(bad.input_sha256) is None
    assert "corrupt" in caplog.text
    assert store.get(good.input_sha256) is not None
    s = store.stats()
    assert s.corrupt_dropped == 1 and s.entries == 1
    assert not store.contains(bad.input_sha256)


def test_corruption_on_disk_is_detected(tmp_path: Path) -> None:
    """Flip bytes of a value inside data.mdb itself, as bit rot would."""
    path = tmp_path / "store"
    with Store(path) as s:
        victim = make_entry(5, text_len=300)
        s.put(victim)
        s.put(make_entry(6))
    data = bytearray((path / "data.mdb").read_bytes())
    marker = b"answer-5-xxxx"
    # Copy-on-write leaves stale copies of pages in the file: damage every copy.
    assert data.count(marker) >= 1
    data = bytearray(data.replace(marker, b"answer-5-yyyy"))
    (path / "data.mdb").write_bytes(bytes(data))
    with Store(path) as s:
        assert s.get(victim.input_sha256) is None
        assert s.get(make_entry(6).input_sha256) is not None
        assert s.verify() == 0  # already dropped on read
        assert s.stats().corrupt_dropped == 1


def test_size_cap_evicts_least_used(tmp_path: Path) -> None:
    one = len(encode_entry(make_entry(0, text_len=2000)))
    with Store(tmp_path / "s", size_cap=one * 10) as s:
        hot = make_entry(0, text_len=2000)
        s.put(hot)
        for _ in range(8):
            s.record_hit(hot.input_sha256)
        s.flush_hits()
        for i in range(1, 40):
            s.put(make_entry(i, text_len=2000))
        st_ = s.stats()
        assert st_.bytes <= one * 10
        assert st_.evictions >= 29
        assert s.get(hot.input_sha256) is not None, "a frequently hit entry outlives cold ones"
        assert s.get(make_entry(1).input_sha256) is None, "the oldest cold entry went first"
        assert s.get(make_entry(39).input_sha256) is not None


def test_entry_larger_than_cap_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s", size_cap=1000) as s:
        with pytest.raises(EntryTooLarge):
            s.put(make_entry(1, text_len=5000))
        assert s.stats().entries == 0


def test_replace_keeps_counters_consistent(store: Store) -> None:
    e = make_entry(7)
    store.put(e)
    e.output = Output(tokens=[1], text="new")
    store.put(e)
    s = store.stats()
    got = store.get(e.input_sha256)
    assert got is not None and got.output.text == "new"
    assert s.entries == 1 and s.bytes == got.size


def test_purge_by_model(store: Store) -> None:
    for i in range(5):
        store.put(make_entry(i))
    for i in range(3):
        store.put(make_entry(i, model_hash="o" * 64))
    assert store.purge("o" * 64) == 3
    assert store.stats().entries == 5
    assert store.purge() == 5
    assert store.stats().entries == 0 and store.stats().bytes == 0


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        for i in range(20):
            s.put(make_entry(i))
    with Store(tmp_path / "s") as s:
        assert s.stats().entries == 20
        assert all(s.get(make_entry(i).input_sha256) for i in range(20))
        assert {e.model_hash for e in s.iter_entries()} == {MODEL}


@settings(max_examples=50, deadline=None)
@given(
    text=st.text(max_size=200),
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=64),
    private=st.booleans(),
    hits=st.integers(0, 10**6),
)
def test_encoding_roundtrip(text: str, tokens: list[int], private: bool, hits: int) -> None:
    e = Entry(
        input_sha256="ab" * 32,
        model_hash=MODEL,
        cache_level="decoder_final",
        output=Output(tokens=tokens, text=text),
        params={"seed": 1},
        privacy_flag=private,
        hits=hits,
    )
    assert decode_entry(encode_entry(e)) == e


def test_small_disk_budget_evicts_and_stays_consistent(tmp_path: Path) -> None:
    """The disk budget (LMDB map) is far below the size cap: writes keep succeeding by
    evicting, every surviving entry reads back intact, counters match the data."""
    with Store(tmp_path / "s", size_cap=1 << 30, map_size=1 << 20) as s:
        for i in range(400):
            s.put(make_entry(i, text_len=6000))
        st_ = s.stats()
        assert st_.evictions > 0 and st_.inserts == 400
        survivors = list(s.iter_entries())
        assert len(survivors) == st_.entries and st_.corrupt_dropped == 0
        assert s.get(make_entry(399).input_sha256) is not None
        with s.env.begin(db=s._entries) as txn:
            assert st_.bytes == sum(len(v) for _, v in txn.cursor())
        with pytest.raises(EntryTooLarge):
            s.put(make_entry(1000, text_len=1 << 20))
        assert s.stats().entries == st_.entries
