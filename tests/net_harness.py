"""Peers in separate processes for the network tests (see tests/net_peer.py)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from p2pcache.node.cluster import NodeProcess, start_node, stop_all

PEER = Path(__file__).with_name("net_peer.py")
ROOT = PEER.parent.parent


class Peer:
    def __init__(
        self,
        *args: str,
        data_dir: Path | None = None,
        ready_timeout: float = 90.0,
        wrap: Sequence[str] = (),
    ) -> None:
        # ``wrap``: a command prefix, e.g. ``ip netns exec <ns>`` to run the peer in a namespace
        cmd = [*wrap, sys.executable, str(PEER), *args]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        self.stderr_path = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"net-peer-{os.getpid()}-{id(self)}.log"
        )
        self._err = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self.wait_event("ready", ready_timeout)
        self.peer_id: str = ready["peer_id"]
        self.addrs: list[str] = ready["addrs"]
        self.addr = self.addrs[0]
        self.model_hash: str = ready["model_hash"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                continue
        self.lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"peer gave no answer in {timeout} s; stderr: {self.stderr_tail()}"
            ) from None
        if msg is None:
            raise RuntimeError(f"peer exited (rc={self.proc.poll()}); stderr: {self.stderr_tail()}")
        return msg

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        for e in self.events:
            if e.get("event") == name:
                self.events.remove(e)
                return e
        while True:
            msg = self._next(timeout)
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)

    def call(self, cmd: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        while True:
            msg = self._next(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            if not msg.get("ok"):
                raise RuntimeError(f"{cmd} failed: {msg.get('error')}\n{msg.get('trace', '')}")
            return msg

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """Clean shutdown (EOF on stdin); kill if it does not exit in time."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                return self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._err.close()
            try:
                self.stderr_path.unlink()
            except OSError:
                pass


class Peers:
    """Starts peers and kills every one of them on exit (also on test failure)."""

    def __init__(self) -> None:
        self.all: list[Peer] = []

    def start(self, *args: str, **kw: Any) -> Peer:
        p = Peer(*args, **kw)
        self.all.append(p)
        return p

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.all:
            try:
                p.close()
            except Exception:
                p.kill()


# -- a line of real node daemons -------------------------------------------------------------

MESH_TIMEOUT_S = 30.0


def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll another process's state over HTTP until ``cond()`` is truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(
            0.1
        )  # polling interval of a cross-process condition, not a synchronisation sleep


def mesh_peers(http: httpx.Client, node: NodeProcess) -> int:
    """Peers in ``node``'s GossipSub mesh for the ad topic (adverts go to mesh peers)."""
    peers = http.get(f"{node.url}/admin/peers").json()["peers"]
    return sum(1 for p in peers if p.get("subscribed") and p.get("mesh"))


@contextmanager
def running_line(
    tmp: Path, extra: Sequence[str], env: dict[str, str]
) -> Iterator[tuple[NodeProcess, ...]]:
    """Three `p2pcache node run` daemons in a line A - B - C (B bootstraps from A, C from B; C
    dials A only once A's adverts reach it, through warm connections), yielded once the ad topic's
    mesh has formed along the line. Stopped with SIGTERM at the end; each must exit cleanly (code
    0), else its log tail is printed."""
    nodes: list[NodeProcess] = []
    try:
        a = start_node("A", tmp / "a", extra=extra, env=env)
        nodes.append(a)
        b = start_node("B", tmp / "b", extra=[*extra, "--bootstrap", a.ready["addrs"][0]], env=env)
        nodes.append(b)
        c = start_node("C", tmp / "c", extra=[*extra, "--bootstrap", b.ready["addrs"][0]], env=env)
        nodes.append(c)
        with httpx.Client(timeout=30) as http:
            for node, n in ((a, 1), (b, 2), (c, 1)):  # the ad topic is joined along the line
                until(
                    lambda node=node, n=n: mesh_peers(http, node) >= n,
                    MESH_TIMEOUT_S,
                    f"{node.name} has {n} mesh peers",
                )
        yield a, b, c
    finally:
        codes = stop_all(nodes)
        for n in nodes:
            if codes.get(n.name) != 0:
                print(f"--- {n.name} log tail ---\n{n.log_tail(60)}")
        assert all(v == 0 for v in codes.values()), codes


@dataclass
class Line:
    """A `running_line` seen from a test: HTTP calls to its nodes, each asserting a 200."""

    a: NodeProcess
    b: NodeProcess
    c: NodeProcess
    http: httpx.Client
    model: str
    tmp: Path
    max_tokens: int = 8

    def complete(
        self, node: NodeProcess, prompt: str, share: bool = True, **kw: Any
    ) -> dict[str, Any]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "share": share,
            **kw,
        }
        r = self.http.post(f"{node.url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert r.headers["x-cache-level"] == doc["x_cache"]["level"]
        return doc

    def admin(self, node: NodeProcess, path: str, **params: Any) -> dict[str, Any]:
        r = self.http.get(f"{node.url}{path}", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def providers(self, node: NodeProcess, key: str, wait_s: float = 0.0) -> list[str]:
        # /admin/providers waits on the node's index-changed event, not a sleep loop
        return self.admin(node, "/admin/providers", key=key, wait_s=wait_s)["providers"]

    def net_stats(self, node: NodeProcess) -> dict[str, Any]:
        return self.admin(node, "/admin/peers")["stats"]

    def keys_seen(self, node: NodeProcess, producer: str) -> int:
        """How many keys ``node``'s gossip index lists ``producer`` for (adverts relayed to it)."""
        return int(self.net_stats(node)["index"]["providers"].get(producer, 0))

    def rep_of(self, node: NodeProcess, peer_id: str) -> dict[str, Any]:
        rows = self.admin(node, "/admin/reputation", peer_id=peer_id)["peers"]
        assert len(rows) == 1
        return rows[0]
