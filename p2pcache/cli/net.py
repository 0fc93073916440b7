"""`p2pcache peers` and `p2pcache reputation`: a node's view of the network.

From a running node (``--url``, or the node.json of ``--data-dir``) over its admin API; when no
node runs on the data dir, straight from its LMDB (read-only): the peers it has dealt with and
their reputation, without connections.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer
from rich.table import Table

from p2pcache.cli.common import DataDirOpt, JsonOpt, err_console, fail, out_console, print_json
from p2pcache.node.client import NodeUnreachable, admin_get, find_node_url
from p2pcache.paths import DataDir

UrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--url",
        help="HTTP URL of a running node (default: the node on --data-dir, else its store).",
    ),
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option(
        "--admin-token", envvar="P2PCACHE_ADMIN_TOKEN", help="Admin token, if the node has one."
    ),
]


def _online(
    url: str | None, data_dir: Path | None, path: str, token: str | None
) -> dict[str, Any] | None:
    """The admin document from a running node, or None when none runs on the data dir."""
    if url:
        try:
            return admin_get(find_node_url(url, None), path, token)
        except NodeUnreachable as exc:
            raise fail(str(exc)) from None
    try:
        base = find_node_url(None, data_dir)
    except NodeUnreachable:
        return None  # no node.json: the node is not running
    try:
        return admin_get(base, path, token)
    except NodeUnreachable as exc:  # a stale node.json (crashed node): read the store instead
        err_console.print(f"[yellow]note:[/] {exc}; reading the data dir instead")
        return None


class _OfflineEvidence:
    def __init__(self, evidence: dict[str, bytes]) -> None:
        self._evidence = evidence

    def evidence(self, evidence_id: str) -> bytes | None:
        return self._evidence.get(evidence_id)


def _offline(data_dir: Path | None, peer_id: str | None = None) -> dict[str, Any]:
    from p2pcache.identity import Identity
    from p2pcache.net.evidence import describe_evidence
    from p2pcache.net.reputation import read_offline

    dd = DataDir.resolve(data_dir)
    try:
        records, evidence = read_offline(dd.store)
    except FileNotFoundError:
        raise fail(f"no running node and no store in {dd.root}") from None
    me = Identity.load_or_create(dd.identity_key).peer_id if dd.identity_key.exists() else None
    rows = []
    for rec in records:
        if peer_id is not None and rec.peer_id != peer_id:
            continue
        row = {**rec.to_dict(), "banned": rec.banned()}
        if peer_id is not None:
            row["evidence_detail"] = [
                describe_evidence(_OfflineEvidence(evidence), e) for e in rec.evidence
            ]
        rows.append(row)
    return {"peer_id": me, "peers": rows, "source": str(dd.store)}


def _when(ms: Any) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def peers(
    url: UrlOpt = None,
    data_dir: DataDirOpt = None,
    admin_token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Peers of a node: connected peers of a running node, else the peers its store knows."""
    doc = _online(url, data_dir, "/admin/peers", admin_token)
    online = doc is not None
    if doc is None:
        doc = _offline(data_dir)
        doc["connected"] = False
    if json:
        print_json(doc)
        return
    rows = doc.get("peers", [])
    if not rows:
        out_console.print(f"node {doc.get('peer_id')} has no peers")
        return
    title = f"peers of {doc.get('peer_id')}" + (
        "" if online else " (from its store; the node is not running)"
    )
    table = Table(title=title)
    for col in (
        "peer",
        "score",
        "banned",
        "mesh" if online else "last seen",
        "addrs" if online else "fetches",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.get("peer_id")),
            f"{float(r.get('score', 0)):.3f}",
            "yes" if r.get("banned") else "no",
            ("yes" if r.get("mesh") else "no") if online else _when(r.get("last_seen")),
            "\n".join(r.get("addrs", [])) if online else str(r.get("fetches", 0)),
        )
    out_console.print(table)
    if online and (stats := doc.get("stats")):
        ads, ev = stats.get("ads", {}), stats.get("evidence", {})
        out_console.print(
            f"adverts accepted {ads.get('accepted', 0)}, rejected {ads.get('rejected', {})}; "
            f"evidence {ev}; L2 {stats.get('tier', {})}"
        )


def reputation(
    peer_id: Annotated[
        Optional[str], typer.Argument(help="Show one peer, with its evidence.")
    ] = None,
    url: UrlOpt = None,
    data_dir: DataDirOpt = None,
    admin_token: TokenOpt = None,
    json: JsonOpt = False,
    peer: Annotated[Optional[str], typer.Option("--peer", help="The same as PEER_ID.")] = None,
) -> None:
    """Reputation of every peer (score, counts, last seen, ban state, evidence)."""
    peer_id = peer_id or peer
    path = "/admin/reputation" + (f"?peer_id={quote(peer_id)}" if peer_id else "")
    doc = _online(url, data_dir, path, admin_token)
    if doc is None:
        doc = _offline(data_dir, peer_id)
    rows = doc.get("peers", [])
    if peer_id is not None:
        rows = [
            r
            for r in rows
            if r.get("peer_id") == peer_id
            and (r.get("fetches") or r.get("evidence") or r.get("last_seen"))
        ]
        if not rows:
            raise fail(f"node {doc.get('peer_id')} has no record of {peer_id}", code=1)
    if json:
        print_json({**doc, "peers": rows})
        return
    if not rows:
        out_console.print(f"node {doc.get('peer_id')} has no reputation records")
        return
    if peer_id is not None:
        r = rows[0]
        table = Table(title=f"{peer_id} at {doc.get('peer_id')}", show_header=False)
        for k in (
            "score",
            "successes",
            "failures",
            "timeouts",
            "bad",
            "bytes_in",
            "fetches",
            "latency_ms",
            "bandwidth",
            "first_seen",
            "last_seen",
            "banned",
            "banned_until",
            "ban_reason",
        ):
            v = r.get(k)
            table.add_row(
                k,
                _when(v)
                if k in ("first_seen", "last_seen", "banned_until")
                else (f"{v:.3f}" if isinstance(v, float) else str(v)),
            )
        out_console.print(table)
        for e in r.get("evidence_detail", []):
            out_console.print(
                f"evidence {e.get('id', '')[:16]}: accuser {e.get('accuser')}, key "
                f"{str(e.get('key', ''))[:16]}, {_when(e.get('ts'))}: {e.get('reason')}"
            )
        return
    table = Table(title=f"reputation at {doc.get('peer_id')}")
    for col in (
        "peer",
        "score",
        "ok",
        "lies",
        "timeouts",
        "bad",
        "bytes in",
        "last seen",
        "banned",
        "evidence",
    ):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: -float(r.get("score", 0))):
        table.add_row(
            str(r.get("peer_id")),
            f"{float(r.get('score', 0)):.3f}",
            f"{r.get('successes', 0):.1f}",
            f"{r.get('failures', 0):.1f}",
            f"{r.get('timeouts', 0):.1f}",
            f"{r.get('bad', 0):.1f}",
            str(r.get("bytes_in", 0)),
            _when(r.get("last_seen")),
            f"yes ({r.get('ban_reason', '')})" if r.get("banned") else "no",
            str(len(r.get("evidence", []))),
        )
    out_console.print(table)
