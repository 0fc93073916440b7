"""Start node daemons as separate processes and stop them (demo, testbed, tests).

A node is ready when it prints its JSON "ready" line on stdout (after HTTP listens); every
wait here has a deadline, and a node that dies before it is ready raises with its log tail.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcache.errors import NodeStartError  # noqa: F401 - re-exported

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.ready["http"])

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``). Returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the exit after a signal was sent (SIGKILL after ``timeout``); sends nothing,
        since a second SIGTERM tells the node to stop without draining."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise NodeStartError(
                f"node {self.name} did not stop within {timeout:.0f} s; killed"
            ) from None
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


def node_command(
    data_dir: Path,
    http: str = "127.0.0.1:0",
    listen: str = "/ip4/127.0.0.1/tcp/0",
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "p2pcache",
        "node",
        "run",
        "--data-dir",
        str(data_dir),
        "--http",
        http,
        "--listen",
        listen,
        *extra,
    ]


def start_node(
    name: str,
    data_dir: Path,
    *,
    http: str = "127.0.0.1:0",
    listen: str = "/ip4/127.0.0.1/tcp/0",
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    wait: bool = True,
) -> NodeProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir / "node.log"
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            node_command(data_dir, http, listen, extra),
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
    node = NodeProcess(name, proc, data_dir, log_path)
    if wait:
        wait_ready(node)
    return node


def wait_ready(node: NodeProcess, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Block until the node prints its ready line (or fail with its log)."""
    deadline = time.monotonic() + timeout
    assert node.proc.stdout is not None
    fd = node.proc.stdout.fileno()
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            node.proc.kill()
            node.proc.wait(timeout=10)
            raise NodeStartError(
                f"node {node.name} not ready within {timeout:.0f} s:\n{node.log_tail()}"
            )
        readable, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:  # stdout closed: the process ended
                code = node.proc.wait(timeout=10)
                raise NodeStartError(
                    f"node {node.name} exited with code {code} before it was ready:\n"
                    f"{node.log_tail()}"
                )
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("event") == "ready":
                    node.ready = doc
                    return doc
        elif node.proc.poll() is not None:
            raise NodeStartError(
                f"node {node.name} exited with code {node.proc.returncode}:\n{node.log_tail()}"
            )


def stop_all(nodes: Sequence[NodeProcess], timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
    """SIGTERM every node at once, then wait for each."""
    for n in nodes:
        n.signal(signal.SIGTERM)
    codes = {}
    for n in nodes:
        try:
            codes[n.name] = n.wait_stopped(timeout)
        except NodeStartError:
            codes[n.name] = -9
    return codes
