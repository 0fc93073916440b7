"""`p2pcache peers` and `p2pcache reputation`: a node's view of the network.

From a running node (``--url``, or the node.json of ``--data-dir``, or the node started last)
over its admin API; when no node runs on the data dir, straight from its LMDB (read-only): the
peers it has dealt with and their reputation, without connections.

Tables need a wide terminal to show whole peer ids; on a narrow one, or in a pipe, each peer
is a short list of lines instead (ids and multiaddrs are copied from here, so never cut).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import quote

import typer
from rich.table import Table

from p2pcache.cli.common import (
    DataDirOpt,
    JsonOpt,
    err_console,
    fail,
    list_layout,
    out_console,
    print_fields,
    print_json,
    print_line,
    print_pairs,
)
from p2pcache.node.client import (
    NodeUnreachable,
    admin_get,
    find_node_url,
    node_data_dir,
    token_for,
)
from p2pcache.paths import DataDir

UrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--url",
        help="HTTP URL of a running node (default: the node on --data-dir or the node started "
        "last, else the data dir's store).",
    ),
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option(
        "--admin-token",
        envvar="P2PCACHE_ADMIN_TOKEN",
        help="Admin token (default: the one the node generated in its data dir, if any).",
    ),
]


def _online(
    url: str | None, data_dir: Path | None, path: str, token: str | None
) -> dict[str, Any] | None:
    """The admin document from a running node, or None when none runs on the data dir."""
    token = token_for(url, data_dir, token)
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

    dd = DataDir.resolve(node_data_dir(data_dir))
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
    if list_layout():
        _peer_list(title, rows, online)
    else:
        _peer_table(title, rows, online)
    if online and (stats := doc.get("stats")):
        ads, ev = stats.get("ads", {}), stats.get("evidence", {})
        out_console.print(
            f"adverts accepted {ads.get('accepted', 0)}, rejected {ads.get('rejected', {})}; "
            f"evidence {ev}; L2 {stats.get('tier', {})}"
        )


def _peer_cells(r: dict[str, Any], online: bool) -> list[tuple[str, Any]]:
    score = f"{float(r.get('score', 0)):.3f}"
    banned = "yes" if r.get("banned") else "no"
    if online:
        return [("score", score), ("banned", banned), ("mesh", "yes" if r.get("mesh") else "no")]
    return [("score", score), ("banned", banned), ("last seen", _when(r.get("last_seen")))]


def _peer_list(title: str, rows: list[dict[str, Any]], online: bool) -> None:
    print_line(title)
    for r in rows:
        print_line("")
        print_line(str(r.get("peer_id")))
        cells = _peer_cells(r, online)
        print_pairs(cells)
        if online:
            print_fields([("addrs", r.get("addrs") or [])], indent="  ")
        else:
            print_line(f"  fetches {r.get('fetches', 0)}")


def _peer_table(title: str, rows: list[dict[str, Any]], online: bool) -> None:
    table = Table(title=title)
    table.add_column("peer", no_wrap=True)
    for col, _ in _peer_cells({}, online):
        table.add_column(col)
    table.add_column("addrs" if online else "fetches", no_wrap=True)
    for r in rows:
        last = "\n".join(r.get("addrs", [])) if online else str(r.get("fetches", 0))
        table.add_row(str(r.get("peer_id")), *(v for _, v in _peer_cells(r, online)), last)
    out_console.print(table)


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
        keys = (
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
        )
        print_line(f"{peer_id} at {doc.get('peer_id')}")
        print_fields([(k, _field(k, r.get(k))) for k in keys], indent="  ")
        for e in r.get("evidence_detail", []):
            print_line(
                f"evidence {e.get('id', '')[:16]}: accuser {e.get('accuser')}, key "
                f"{str(e.get('key', ''))[:16]}, {_when(e.get('ts'))}: {e.get('reason')}"
            )
        return
    title = f"reputation at {doc.get('peer_id')}"
    ranked = sorted(rows, key=lambda r: -float(r.get("score", 0)))
    if list_layout():
        print_line(title)
        for r in ranked:
            print_line("")
            print_line(str(r.get("peer_id")))
            print_pairs(_rep_cells(r))
        return
    table = Table(title=title)
    table.add_column("peer", no_wrap=True)
    for col, _ in _rep_cells({}):
        table.add_column(col)
    for r in ranked:
        table.add_row(str(r.get("peer_id")), *(v for _, v in _rep_cells(r)))
    out_console.print(table)


def _field(key: str, v: Any) -> str:
    if key in ("first_seen", "last_seen", "banned_until"):
        return _when(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _rep_cells(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("score", f"{float(r.get('score', 0)):.3f}"),
        ("ok", f"{r.get('successes', 0):.1f}"),
        ("lies", f"{r.get('failures', 0):.1f}"),
        ("timeouts", f"{r.get('timeouts', 0):.1f}"),
        ("bad", f"{r.get('bad', 0):.1f}"),
        ("bytes in", str(r.get("bytes_in", 0))),
        ("last seen", _when(r.get("last_seen"))),
        ("banned", f"yes ({r.get('ban_reason', '')})" if r.get("banned") else "no"),
        ("evidence", str(len(r.get("evidence", [])))),
    ]
