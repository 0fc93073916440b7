"""Talking to a running node over HTTP (for the CLI and tests): find it, call its admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from p2pcache.errors import NodeUnreachable  # noqa: F401 - re-exported
from p2pcache.paths import DataDir

DEFAULT_TIMEOUT_S = 10.0


def find_node_url(url: str | None, data_dir: str | Path | None) -> str:
    """``url`` if given, else the URL the node running on ``data_dir`` wrote to node.json."""
    if url:
        return url.rstrip("/")
    dd = DataDir.resolve(data_dir)
    info = dd.root / "node.json"
    try:
        doc = json.loads(info.read_text())
    except FileNotFoundError:
        raise NodeUnreachable(
            f"no running node found for {dd.root} (no node.json); "
            f"start one with `p2pcache node run` "
            f"or pass --url"
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
