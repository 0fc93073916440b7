"""`p2pcache cache ...`: inspect and manage the local store (no model needed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.table import Table

from p2pcache.cli.common import (
    DataDirOpt,
    JsonOpt,
    fail,
    list_layout,
    out_console,
    print_fields,
    print_json,
    print_line,
)
from p2pcache.kv import KvChunkStore
from p2pcache.node.client import node_data_dir
from p2pcache.paths import DataDir
from p2pcache.store import Store

app = typer.Typer(help="Inspect and manage the local cache store.", no_args_is_help=True)


def _data_dir(data_dir: DataDirOpt) -> DataDir:
    """--data-dir (or $P2PCACHE_DATA_DIR), else the running node's started last, else the
    default: a node started with a custom data dir is found without the flag."""
    return DataDir.resolve(node_data_dir(data_dir))


def _open(data_dir: DataDirOpt) -> Store:
    dd = _data_dir(data_dir)
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
def stats(
    data_dir: DataDirOpt = None,
    json: JsonOpt = False,
    url: Annotated[
        Optional[str],
        typer.Option("--url", help="Ask the running node at this URL (/admin/cache) instead."),
    ] = None,
    admin_token: Annotated[
        Optional[str],
        typer.Option(envvar="P2PCACHE_ADMIN_TOKEN", help="The running node's admin token."),
    ] = None,
) -> None:
    """Entry count, bytes, hit rate, evictions and corruption counters."""
    if url:  # a running node holds the store: ask it
        from p2pcache.cli.node import print_node_cache_stats

        print_node_cache_stats(url.rstrip("/"), admin_token, json)
        return
    with _open(data_dir) as store:
        s = store.stats()
        kv = KvChunkStore(store).stats()
    kv_doc = {
        **asdict(kv),
        "dedup_ratio": kv.dedup_ratio,
        "prefix_hit_rate": kv.prefix_hit_rate,
        "token_hit_rate": kv.token_hit_rate,
    }
    if json:
        print_json({**asdict(s), "hit_rate": s.hit_rate, "kv": kv_doc})
        return
    rows = [
        ("entries", f"{s.entries:,}"),
        ("bytes", f"{_human(s.bytes)} of {_human(s.size_cap)} cap"),
        ("file", _human(s.file_bytes)),
        ("hits / misses", f"{s.hits:,} / {s.misses:,} ({s.hit_rate:.1%} hit rate)"),
        ("inserts", f"{s.inserts:,}"),
        ("evictions", f"{s.evictions:,}"),
        ("corrupt values dropped", f"{s.corrupt_dropped:,}"),
        ("KV chunks", f"{kv.chunks:,}"),
        ("KV bytes", f"{_human(kv.bytes)} of {_human(kv.size_cap)} cap"),
        ("KV dedup ratio", f"{kv.dedup_ratio:.2f}x ({_human(kv.logical_bytes)} offered)"),
        (
            "KV prefix hit rate",
            f"{kv.lookup_hits:,} / {kv.lookups:,} requests ({kv.prefix_hit_rate:.1%}); "
            f"{kv.restored_tokens:,} / {kv.lookup_tokens:,} prompt tokens restored "
            f"({kv.token_hit_rate:.1%})",
        ),
        ("KV corrupt chunks dropped", f"{kv.corrupt_dropped:,}"),
    ]
    print_line(f"p2pcache store {s.path}")
    print_fields(rows, indent="  ")


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
    if list_layout():
        print_line(f"{len(entries)} entries")
        for e in entries:
            text = e.output.text.replace("\n", " ")
            print_line(
                f"{e.input_sha256[:12]}  {e.cache_level}  model {e.model_hash[:8]}  "
                f"{'private' if e.privacy_flag else 'shared'}  {e.hits} hits  {_human(e.size)}  "
                f"{_when(max(e.inserted_at, e.last_hit_at))}"
            )
            print_line("  " + text[:70] + ("…" if len(text) > 70 else ""))
        return
    table = Table(title=f"{len(entries)} entries")
    for col in ("key", "level", "model", "private", "hits", "size", "last used", "output"):
        table.add_column(col, overflow="fold" if col == "output" else "ellipsis")
    for e in entries:
        text = e.output.text.replace("\n", " ")
        table.add_row(
            e.input_sha256[:12],
            e.cache_level,
            e.model_hash[:8],
            "yes" if e.privacy_flag else "no",
            str(e.hits),
            _human(e.size),
            _when(max(e.inserted_at, e.last_hit_at)),
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
        # KV chunks are addressed by hash chains, not indexed by model: purge them only with
        # everything else (their chains already keep models apart).
        kv_n = KvChunkStore(store).purge() if model_hash is None else 0
    if json:
        print_json({"deleted": n, "kv_chunks_deleted": kv_n})
    else:
        out_console.print(f"deleted {n} entries and {kv_n} KV chunks")


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


@app.command()
def similar(
    prompt: Annotated[
        str, typer.Argument(help="Text to look up (a completion prompt, or a chat user message).")
    ],
    data_dir: DataDirOpt = None,
    json: JsonOpt = False,
    k: Annotated[int, typer.Option("-k", min=1, help="How many neighbours to show.")] = 5,
    model_hash: Annotated[Optional[str], typer.Option(help="Only entries of this model.")] = None,
) -> None:
    """The L1 index's nearest cached prompts to PROMPT, with cosine similarity and the
    gate's lexical verdict (the model part of the gate runs only when a request is served)."""
    from p2pcache.semantic import Embedder, EmbedderUnavailable, SemanticIndex
    from p2pcache.semantic.lexical import lexical_reject
    from p2pcache.semantic.tier import phrase_similarity

    dd = _data_dir(data_dir)
    with _open(data_dir) as store:
        try:
            embedder = Embedder()
        except EmbedderUnavailable as exc:
            raise fail(str(exc)) from None
        directory = dd.root / "semantic"
        models = (
            [model_hash]
            if model_hash
            else sorted(
                {p.stem for p in directory.glob("*.faiss")} if directory.exists() else set()
            )
        )
        vec = embedder.embed_one(prompt)
        similarity = phrase_similarity(embedder)
        hits = []
        for mh in models:
            index = SemanticIndex(store, directory, mh, embedder.dim)
            for sim, rec in index.search(vec, k):
                entry = store.get(rec.input_sha256)
                if entry is None:
                    continue
                hits.append(
                    {
                        "similarity": sim,
                        "input_sha256": rec.input_sha256,
                        "model_hash": mh,
                        "faiss_id": rec.faiss_id,
                        "prompt": rec.text,
                        "answer": entry.output.text,
                        "hits": entry.hits,
                        "lexical": lexical_reject(prompt, rec.text, similarity) or "ok",
                        "base_logprob": rec.base_logprob,
                    }
                )
            index.close()
    hits = sorted(hits, key=lambda h: -h["similarity"])[:k]
    if json:
        print_json({"query": prompt, "neighbours": hits})
        return
    table = Table(title=f"nearest cached prompts to {prompt[:40]!r}")
    for col in ("similarity", "key", "prompt", "answer", "lexical check"):
        table.add_column(col, overflow="fold")
    for h in hits:
        table.add_row(
            f"{h['similarity']:.3f}",
            h["input_sha256"][:12],
            h["prompt"][:60],
            h["answer"].replace("\n", " ")[:50],
            h["lexical"],
        )
    out_console.print(table)
