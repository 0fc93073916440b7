"""A process killed with SIGKILL during a burst of writes leaves a consistent store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from p2pcache.store import Store
from tests._entries import make_entry

WRITER = """
import sys
from p2pcache.store import Store
from tests._entries import make_entry
start = int(sys.argv[2])
store = Store(sys.argv[1], size_cap=1 << 30)
for i in range(start, start + 100_000):
    store.put(make_entry(i, text_len=(i * 37) % 4000))
    if i % 7 == 0:
        store.record_hit(make_entry(i - 3).input_sha256)  # hit flushes interleave with puts
    print(i, flush=True)
"""


def _burst_then_kill(path: Path, start: int, kill_after: int) -> list[int]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    committed: list[int] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            committed.append(int(line))
            if len(committed) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return committed


def test_sigkill_during_writes_keeps_every_committed_entry(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = random.Random(1234)
    all_committed: list[int] = []
    start = 0
    for _ in range(3):
        committed = _burst_then_kill(path, start, kill_after=rng.randint(50, 400))
        all_committed += committed
        start = committed[-1] + 1 if committed else start
        with Store(path, size_cap=1 << 30) as store:  # opens after every crash
            for i in all_committed:
                entry = store.get(make_entry(i).input_sha256)
                assert entry is not None, f"committed entry {i} lost"
                assert entry.output.text.startswith(f"answer-{i}-")
            stats = store.stats()
            # Counters are written in the same transactions as the data they count.
            assert stats.entries == sum(1 for _ in store.iter_entries())
            with store.env.begin(db=store._entries) as txn:
                assert stats.bytes == sum(len(v) for _, v in txn.cursor())
            assert stats.corrupt_dropped == 0
            assert stats.entries >= len(all_committed)
