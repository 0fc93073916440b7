"""A disk that fills up: writes fail cleanly, the store stays consistent, nothing is lost."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcache.store import Store, StoreError
from tests._entries import make_entry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_root
def test_enospc_fails_cleanly_and_keeps_committed_entries(tiny_disk: Path) -> None:
    path = tiny_disk / "store"
    committed: list[int] = []
    errors: list[StoreError] = []
    with Store(path, size_cap=64 << 20) as store:  # the cap is far above the 1 MiB disk
        for i in range(300):
            try:
                store.put(make_entry(i, text_len=8000))
                committed.append(i)
            except StoreError as exc:
                errors.append(exc)
        assert errors, "a 1 MiB disk must fill up"
        assert "disk full" in str(errors[0])
        # The store keeps serving reads after a failed write ...
        assert all(store.get(make_entry(i).input_sha256) for i in committed)
        # ... and accepts writes again once space is freed.
        for i in committed[:10]:
            assert store.delete(make_entry(i).input_sha256)
        committed = committed[10:]
        store.put(make_entry(10_000, text_len=8000))
        committed.append(10_000)
    with Store(path, size_cap=64 << 20) as store:  # and reopens intact
        s = store.stats()
        assert s.entries == len(committed) and s.corrupt_dropped == 0
        assert all(store.get(make_entry(i).input_sha256) for i in committed)
        with store.env.begin(db=store._entries) as txn:
            assert s.bytes == sum(len(v) for _, v in txn.cursor())
