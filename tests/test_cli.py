"""The `p2pcache` command line, run as a user would (separate processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2PCACHE_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "p2pcache", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_twice_then_stats(tmp_path: Path) -> None:
    args = ("generate", "Write one word:", "--max-tokens", "5", "--json", "--n-ctx", "1024")
    first = json.loads(cli(tmp_path, *args).stdout)
    second = json.loads(cli(tmp_path, *args).stdout)
    assert first["cache_level"] == "L3" and second["cache_level"] == "L0"
    assert first["text"] == second["text"]
    for field in ("input_sha256", "model_hash"):
        assert first[field] == second[field] and len(first[field]) == 64
    for field in (
        "prefill_ms",
        "decode_ms",
        "total_ms",
        "prompt_tokens",
        "cached_prompt_tokens",
        "completion_tokens",
    ):
        assert field in first["timings"]
    assert first["timings"]["cached_prompt_tokens"] == 0

    stats = json.loads(cli(tmp_path, "cache", "stats", "--json").stdout)
    assert stats["entries"] == 1 and stats["hits"] == 1 and stats["misses"] == 1
    listing = json.loads(cli(tmp_path, "cache", "ls", "--json").stdout)
    assert listing["entries"][0]["input_sha256"] == first["input_sha256"]
    assert listing["entries"][0]["privacy_flag"] is True
    shared = json.loads(
        cli(
            tmp_path, "generate", "Another", "-n", "3", "--share", "--json", "--n-ctx", "1024"
        ).stdout
    )
    rows = {
        e["input_sha256"]: e
        for e in json.loads(cli(tmp_path, "cache", "ls", "--json").stdout)["entries"]
    }
    assert rows[shared["input_sha256"]]["privacy_flag"] is False
    assert json.loads(cli(tmp_path, "cache", "purge", "--yes", "--json").stdout)["deleted"] == 2


def test_clear_errors(tmp_path: Path) -> None:
    bad_model = cli(tmp_path, "generate", "hi", "--model", str(tmp_path / "nope.gguf"), check=False)
    assert bad_model.returncode == 2 and "model file not found" in bad_model.stderr
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"hello")
    assert (
        "not a GGUF"
        in cli(tmp_path, "generate", "hi", "--model", str(not_gguf), check=False).stderr
    )
    too_long = cli(tmp_path, "generate", "word " * 600, "--n-ctx", "512", check=False)
    assert too_long.returncode == 2 and "context window" in too_long.stderr
    neg = cli(tmp_path, "generate", "hi", "--max-tokens", "-3", check=False)
    assert neg.returncode == 2
    no_store = cli(tmp_path / "empty", "cache", "stats", check=False)
    assert no_store.returncode == 2 and "no store" in no_store.stderr
