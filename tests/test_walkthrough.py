"""A new user's walk-through, from the README to a two-node share, run as written.

The commands are read from the README's walkthrough block and run in order: node A, its
status (where the user reads A's multiaddr), node B bootstrapped from it, B's peers (until A
is in B's mesh), the same shared chat question to A (L3) and to B (L2, from A). Only the ports
and data dirs are swapped for free ones, and the multiaddr placeholder for A's real one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2pcache.node.cluster import NodeProcess, stop_all, wait_ready

README = Path(__file__).resolve().parent.parent / "README.md"
CLI_TIMEOUT_S = 60  # one CLI call (loads no model)
ANSWER_TIMEOUT_S = 300  # one chat answer on a busy 2-core machine
MESH_TIMEOUT_S = 60  # B connects to A and joins its advert mesh
ADDR = re.compile(r"/ip4/\S+/p2p/12D3KooW\w+")
PLACEHOLDER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW..."


def readme_commands() -> list[list[str]]:
    """The walkthrough block's commands, one argv each (comment lines dropped)."""
    text = README.read_text()
    block = text.split("<!-- walkthrough:begin -->", 1)[1].split("<!-- walkthrough:end -->")[0]
    code = block.split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [shlex.split(ln, comments=True) for ln in lines]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Walk:
    """Runs README commands with the user's ports and dirs mapped to this test's."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.subs: dict[str, str] = {}
        for port in ("8080", "8081"):
            self.subs[f"127.0.0.1:{port}"] = f"127.0.0.1:{free_port()}"
        for port in ("4001", "4002"):
            self.subs[f"/tcp/{port}"] = f"/tcp/{free_port()}"
        for name in ("node-a", "node-b"):
            self.subs[f"/tmp/{name}"] = str(tmp_path / name)
        self.nodes: list[NodeProcess] = []
        # A terminal wide enough that no multiaddr wraps (tables fit it).
        self.env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}

    def argv(self, argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            for old, new in self.subs.items():  # the placeholder first: it contains /tcp/4001
                arg = arg.replace(old, new)
            out.append(arg)
        if out[0] == "p2pcache":
            return [sys.executable, "-m", "p2pcache", *out[1:]]
        return out

    def start(self, name: str, argv: list[str]) -> NodeProcess:
        assert argv[:3] == ["p2pcache", "node", "run"], argv
        data_dir = Path(self.argv(argv[argv.index("--data-dir") + 1 :])[0])
        log_path = self.tmp_path / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self.argv(argv), stdout=subprocess.PIPE, stderr=log, env=self.env
            )
        node = NodeProcess(name, proc, data_dir, log_path)
        self.nodes.append(node)
        wait_ready(node)
        return node

    def cli(self, argv: list[str], *extra: str) -> str:
        assert argv[0] == "p2pcache", argv
        proc = subprocess.run(
            [*self.argv(argv), *extra],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            env=self.env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def curl(self, argv: list[str]) -> dict[str, Any]:
        assert argv[0] == "curl", argv
        real = self.argv(argv)
        if shutil.which("curl"):
            proc = subprocess.run(
                [*real, "--max-time", str(ANSWER_TIMEOUT_S)],
                capture_output=True,
                text=True,
                timeout=ANSWER_TIMEOUT_S + 10,
            )
            assert proc.returncode == 0, proc.stderr
            return dict(json.loads(proc.stdout))
        # No curl on this machine: the same POST (curl -d sends a form content type).
        url = next(a for a in real if a.startswith("http"))
        data = real[real.index("-d") + 1]
        r = httpx.post(
            url,
            content=data,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=ANSWER_TIMEOUT_S,
        )
        return dict(r.json())


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    w = Walk(tmp_path)
    try:
        yield w
    finally:
        stop_all(w.nodes)


def wait_in_mesh(walk: Walk, peers_argv: list[str], peer_id: str) -> None:
    """`p2pcache peers` (as the README has it, plus --json) until ``peer_id`` is in the mesh:
    adverts reach mesh peers only. Each call is a process start: no sleep needed between."""
    deadline = time.monotonic() + MESH_TIMEOUT_S
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = json.loads(walk.cli(peers_argv, "--json"))
        if any(p.get("peer_id") == peer_id and p.get("mesh") for p in doc.get("peers", [])):
            return
    raise AssertionError(f"{peer_id} not in the mesh within {MESH_TIMEOUT_S} s: {doc}")


def test_the_readme_walkthrough_shares_an_answer(walk: Walk) -> None:
    cmds = readme_commands()
    run_a, status_a, run_b, peers_b, ask_a, ask_b = cmds
    assert [c[0] for c in cmds] == ["p2pcache"] * 4 + ["curl"] * 2

    a = walk.start("A", run_a)
    shown = ADDR.findall(walk.cli(status_a))  # the user copies A's multiaddr from here
    assert shown == a.ready["addrs"], shown
    assert PLACEHOLDER in run_b
    walk.subs = {PLACEHOLDER: shown[0], **walk.subs}
    b = walk.start("B", run_b)
    wait_in_mesh(walk, peers_b, a.peer_id)

    first = walk.curl(ask_a)
    content = first["choices"][0]["message"]["content"]
    assert first["x_cache"]["level"] == "L3" and "Paris" in content, first
    second = walk.curl(ask_b)
    assert second["x_cache"]["level"] == "L2", second
    assert second["choices"][0]["message"]["content"] == content
    assert second["x_cache"]["peer"]["peer"] == a.peer_id
    assert second["x_cache"]["peer"]["verified"] is True
    assert b.peer_id != a.peer_id
