"""`p2pcache demo` end to end: three node processes, a workload, where each answer came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def test_demo_runs_three_nodes_and_reports_levels(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pcache",
            "demo",
            "--max-tokens",
            "12",
            "--timeout",
            "400",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "3 nodes ready" in out and out.count("127.0.0.1:") >= 3
    assert "Where each answer came from" in out
    assert "L3 computed" in out and "L0 local cache" in out and "L0 single-flight" in out
    # 14 answers: Q1 on node-1 (L3, L0), Q1 on node-2, Q3 twice, Q2 eight times at once + streamed
    assert "14 answers" in out
    assert "did not stop cleanly" not in r.stderr
    # With the network layer node-2 gets node-1's answer from node-1 (12 tokens: fetching and
    # verifying beats computing, so the cost model does not skip the peer).
    if "without the network layer" not in out:
        assert "L2 from a peer" in out
    # the nodes kept their data: a second run answers node-1's first question from L0
    assert (tmp_path / "demo" / "node-1" / "store" / "data.mdb").exists()
    assert not (tmp_path / "demo" / "node-1" / "node.json").exists()  # removed on clean exit
