"""`p2pcache node ...`: run a node daemon and inspect a running one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from p2pcache.cli import net
from p2pcache.cli.common import JsonOpt, fail, out_console, print_json
from p2pcache.node.client import NodeUnreachable, admin_get, find_node_url
from p2pcache.node.config import CONFIG_ENV, ConfigError, NodeConfig, env_name, load_config

app = typer.Typer(
    help="Run a p2pcache node (HTTP API + cache + network) and inspect running nodes.",
    no_args_is_help=True,
)

_ENV_HELP = ", ".join(env_name(k) for k in NodeConfig.model_fields)


def _default(key: str) -> Any:
    """A config key's default, for help texts (defined once, in `NodeConfig`)."""
    return NodeConfig.model_fields[key].default


def _flags(**kw: Any) -> dict[str, Any]:
    """Flags as config values: unset flags (None, or an empty repeatable option) are left out."""
    return {
        k: (list(v) if isinstance(v, (list, tuple)) else v)
        for k, v in kw.items()
        if v is not None and v != [] and v != ()
    }


ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help=f"TOML config file (or ${CONFIG_ENV}).")
]
NodeDataDirOpt = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Data dir (default: ~/.local/share/p2pcache).")
]
UrlOpt = Annotated[
    Optional[str],
    typer.Option("--url", help="Node HTTP URL (default: the node running on --data-dir)."),
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option(
        "--admin-token", envvar="P2PCACHE_ADMIN_TOKEN", help="Admin token, if the node has one."
    ),
]
DataDirLookupOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir", envvar="P2PCACHE_DATA_DIR", help="Find the node running on this data dir."
    ),
]


def _config(config: Path | None, flags: dict[str, Any]) -> NodeConfig:
    try:
        return load_config(config, os.environ, flags)
    except ConfigError as exc:
        raise fail(str(exc)) from None


@app.command()
def run(
    config: ConfigOpt = None,
    data_dir: NodeDataDirOpt = None,
    listen: Annotated[
        Optional[list[str]], typer.Option("--listen", help="libp2p listen multiaddr (repeatable).")
    ] = None,
    http: Annotated[
        Optional[str],
        typer.Option(
            "--http", help=f"HTTP API HOST:PORT (default: {_default('http')}; port 0: any)."
        ),
    ] = None,
    bootstrap: Annotated[
        Optional[list[str]],
        typer.Option("--bootstrap", help="Bootstrap multiaddr ending in /p2p/<id> (repeatable)."),
    ] = None,
    bootstrap_http: Annotated[
        Optional[list[str]],
        typer.Option(
            "--bootstrap-http",
            help="Use the p2p addrs of the node at this HTTP URL as bootstrap (repeatable).",
        ),
    ] = None,
    model: Annotated[
        Optional[Path],
        typer.Option("--model", help="GGUF model file (default: embedded Gemma 3 270M Q4_K_M)."),
    ] = None,
    share_by_default: Annotated[
        Optional[bool],
        typer.Option(
            "--share-by-default/--private-by-default",
            help="Share entries with peers unless a request says otherwise (default: private).",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        Optional[int],
        typer.Option(
            "--max-queue",
            help="Requests that may wait for the model; more get HTTP 429 "
            f"(default: {_default('max_queue')}).",
        ),
    ] = None,
    n_ctx: Annotated[
        Optional[int],
        typer.Option("--n-ctx", help=f"Context window in tokens (default: {_default('n_ctx')})."),
    ] = None,
    log_level: Annotated[
        Optional[str],
        typer.Option(
            "--log-level", help=f"debug, info, warning or error (default: {_default('log_level')})."
        ),
    ] = None,
    log_format: Annotated[
        Optional[str],
        typer.Option(
            "--log-format",
            help=f"json (one object per line) or text (default: {_default('log_format')}).",
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the merged config as TOML and exit.")
    ] = False,
) -> None:
    """Run a node until SIGINT/SIGTERM.

    Settings come from the --config TOML file, then P2PCACHE_* environment variables, then
    these flags (later wins). Every config key has an environment variable:
    P2PCACHE_<KEY> (lists comma-separated). Once serving, the node prints one JSON line with
    "event": "ready" on stdout and writes <data dir>/node.json; logs go to stderr.
    """
    cfg = _config(
        config,
        _flags(
            data_dir=data_dir,
            listen=listen,
            http=http,
            bootstrap=bootstrap,
            bootstrap_http=bootstrap_http,
            model=model,
            share_by_default=share_by_default,
            max_queue=max_queue,
            n_ctx=n_ctx,
            log_level=log_level,
            log_format=log_format,
        ),
    )
    if print_config:
        import tomli_w

        out_console.print(tomli_w.dumps(cfg.to_toml_dict()), markup=False, highlight=False, end="")
        return
    import trio

    from p2pcache.backend import ModelNotFound
    from p2pcache.logs import setup_node_logging
    from p2pcache.node.daemon import run_node

    setup_node_logging(cfg.log_level, cfg.log_format)
    try:
        code = trio.run(run_node, cfg)
    except ModelNotFound as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # e.g. the HTTP port is taken
        raise fail(f"cannot start the node: {exc}") from None
    raise typer.Exit(code)


run.__doc__ = (run.__doc__ or "").rstrip() + f"\n\n    Environment: {_ENV_HELP}.\n"


def _get(url: str | None, data_dir: Path | None, path: str, token: str | None) -> Any:
    try:
        return admin_get(find_node_url(url, data_dir), path, token)
    except NodeUnreachable as exc:
        raise fail(str(exc)) from None


@app.command()
def status(
    url: UrlOpt = None,
    data_dir: DataDirLookupOpt = None,
    admin_token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Identity, model, addresses, queue and uptime of a running node."""
    doc = _get(url, data_dir, "/admin/status", admin_token)
    if json:
        print_json(doc)
        return
    table = Table(show_header=False, title="p2pcache node")
    for key in (
        "peer_id",
        "model",
        "model_hash",
        "http",
        "addrs",
        "bootstrap",
        "data_dir",
        "uptime_s",
        "queue_depth",
        "max_queue",
        "model_busy",
        "computations",
        "share_by_default",
        "draining",
        "version",
    ):
        v = doc.get(key)
        table.add_row(key, ", ".join(v) if isinstance(v, list) else str(v))
    out_console.print(table)


# `node peers` / `node reputation` are the top-level `peers` / `reputation` commands.
app.command(name="peers")(net.peers)
app.command(name="reputation")(net.reputation)


def print_node_cache_stats(url: str, token: str | None, as_json: bool) -> None:
    """`p2pcache cache stats --url`: the running node's /admin/cache."""
    try:
        doc = admin_get(url, "/admin/cache", token)
    except NodeUnreachable as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(doc)
        return
    table = Table(title=f"p2pcache node {url}", show_header=False)
    for key in (
        "entries",
        "bytes",
        "size_cap",
        "hits",
        "misses",
        "hit_rate",
        "inserts",
        "evictions",
        "corrupt_dropped",
        "answers_by_level",
    ):
        v = doc.get(key)
        table.add_row(key, f"{v:.1%}" if key == "hit_rate" else str(v))
    out_console.print(table)
