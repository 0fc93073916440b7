"""`p2pcache cache ...`: inspect and manage the local store (no model needed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.table import Table

from p2pcache.cli.common import DataDirOpt, JsonOpt, fail, out_console, print_json
from p2pcache.paths import DataDir
from p2pcache.store import Store

app = typer.Typer(help="Inspect and manage the local cache store.", no_args_is_help=True)


def _open(data_dir: DataDirOpt) -> Store:
    dd = DataDir.resolve(data_dir)
    if not dd.store.exists():
        raise fail(f"no store in {dd.root} (run `p2pcache generate` first or pass --data-dir)")
    return Store(dd.store)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


@app.command()
def stats(data_dir: DataDirOpt = None, json: JsonOpt = False) -> None:
    """Entry count, bytes, hit rate, evictions and corruption counters."""
    with _open(data_dir) as store:
        s = store.stats()
    if json:
        print_json({**asdict(s), "hit_rate": s.hit_rate})
        return
    table = Table(title=f"p2pcache store {s.path}", show_header=False)
    rows = [
        ("entries", f"{s.entries:,}"),
        ("bytes", f"{_human(s.bytes)} of {_human(s.size_cap)} cap"),
        ("file", _human(s.file_bytes)),
        ("hits / misses", f"{s.hits:,} / {s.misses:,} ({s.hit_rate:.1%} hit rate)"),
        ("inserts", f"{s.inserts:,}"),
        ("evictions", f"{s.evictions:,}"),
        ("corrupt values dropped", f"{s.corrupt_dropped:,}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console.print(table)


@app.command("ls")
def list_entries(
    data_dir: DataDirOpt = None,
    json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Show at most this many entries.")] = 50,
    model_hash: Annotated[Optional[str], typer.Option(help="Only entries of this model.")] = None,
) -> None:
    """List entries, most recently used first."""
    with _open(data_dir) as store:
        entries = sorted(
            store.iter_entries(model_hash),
            key=lambda e: max(e.inserted_at, e.last_hit_at),
            reverse=True,
        )[:limit]
    if json:
        rows = []
        for e in entries:
            d = e.to_dict()
            d["signature"] = e.signature.hex()
            rows.append(d)
        print_json({"entries": rows})
        return
    table = Table(title=f"{len(entries)} entries")
    for col in ("key", "level", "model", "private", "hits", "size", "last used", "output"):
        table.add_column(col, overflow="fold" if col == "output" else "ellipsis")
    for e in entries:
        text = e.output.text.replace("\n", " ")
        table.add_row(
            e.input_sha256[:12], e.cache_level, e.model_hash[:8], "yes" if e.privacy_flag else "no",
            str(e.hits), _human(e.size), _when(max(e.inserted_at, e.last_hit_at)),
            text[:60] + ("…" if len(text) > 60 else ""),
        )
    out_console.print(table)


@app.command()
def purge(
    data_dir: DataDirOpt = None,
    model_hash: Annotated[Optional[str], typer.Option(help="Only entries of this model.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json: JsonOpt = False,
) -> None:
    """Delete every entry (or every entry of one model)."""
    with _open(data_dir) as store:
        what = f"entries of model {model_hash}" if model_hash else "all entries"
        if not yes and not typer.confirm(f"Delete {what} in {store.path}?"):
            raise typer.Exit(1)
        n = store.purge(model_hash)
    if json:
        print_json({"deleted": n})
    else:
        out_console.print(f"deleted {n} entries")


@app.command()
def verify(data_dir: DataDirOpt = None, json: JsonOpt = False) -> None:
    """Check every stored value's checksum; drop and report corrupt ones."""
    with _open(data_dir) as store:
        dropped = store.verify()
        s = store.stats()
    if json:
        print_json({"dropped": dropped, "entries": s.entries})
    else:
        out_console.print(f"{s.entries} entries ok, {dropped} corrupt dropped")
    if dropped:
        raise typer.Exit(1)
