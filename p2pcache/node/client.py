"""Talking to a running node over HTTP (for the CLI and tests): find it, call its admin API.

A node is found by, in order: ``--url``; ``--data-dir`` (or ``$P2PCACHE_DATA_DIR``), whose
``node.json`` the running node wrote; the node started last (``last-node.json``, see
`p2pcache.paths.last_node_path`) while it still runs; the default data dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from p2pcache.errors import NodeUnreachable  # noqa: F401 - re-exported
from p2pcache.paths import DataDir, last_node_path

DEFAULT_TIMEOUT_S = 10.0


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def last_node() -> dict[str, Any] | None:
    """The record of the node started last, while that node still runs (else None: a stopped
    node's data dir must not shadow the default one)."""
    try:
        doc = json.loads(last_node_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("data_dir") or not _alive(doc.get("pid")):
        return None
    if not DataDir(Path(doc["data_dir"])).node_info.exists():
        return None  # stopped cleanly; the pid was reused by another process
    return doc


def node_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir`` if given, else the running last node's, else None (the default)."""
    if data_dir:
        return Path(data_dir).expanduser()
    doc = last_node()
    return Path(doc["data_dir"]) if doc else None


def admin_token(data_dir: str | Path | None, given: str | None = None) -> str | None:
    """``given``, else the token a node generated in its data dir (readable by its owner)."""
    if given:
        return given
    try:
        return DataDir.resolve(node_data_dir(data_dir)).admin_token.read_text().strip() or None
    except OSError:
        return None


def token_for(url: str | None, data_dir: str | Path | None, given: str | None) -> str | None:
    """The admin token to send: ``given``, else the generated one of the node addressed (by
    ``url`` only when it is the last node's URL: another node's token stays unsent)."""
    if given or not url:
        return admin_token(data_dir, given)
    doc = last_node()
    if doc and str(doc.get("http", "")).rstrip("/") == url.rstrip("/"):
        return admin_token(doc["data_dir"])
    return None


def find_node_url(url: str | None, data_dir: str | Path | None) -> str:
    """``url`` if given, else the URL the node running on ``data_dir`` (default: the node
    started last, while it runs) wrote to node.json."""
    if url:
        return url.rstrip("/")
    dd = DataDir.resolve(node_data_dir(data_dir))
    info = dd.node_info
    try:
        doc = json.loads(info.read_text())
    except FileNotFoundError:
        raise NodeUnreachable(
            f"no running node found for {dd.root} (no node.json); "
            f"start one with `p2pcache node run`, or pass --data-dir or --url"
        ) from None
    except (OSError, ValueError) as exc:
        raise NodeUnreachable(f"cannot read {info}: {exc}") from None
    if not doc.get("http"):
        raise NodeUnreachable(f"{info} names no HTTP address")
    return str(doc["http"]).rstrip("/")


def admin_get(
    url: str, path: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(f"{url}{path}", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise NodeUnreachable(f"cannot reach the node at {url}: {exc}") from None
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:200]
        raise NodeUnreachable(f"{url}{path} answered {r.status_code}: {msg}")
    return r.json()
