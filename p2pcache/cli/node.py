"""`p2pcache node ...`: run a node daemon and inspect a running one."""

from __future__ import annotations

import logging
import os
import traceback
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from p2pcache.cli import net
from p2pcache.cli.common import JsonOpt, fail, out_console, print_fields, print_json
from p2pcache.errors import StartupError
from p2pcache.node.client import NodeUnreachable, admin_get, find_node_url, token_for
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
    typer.Option(
        "--url",
        help="Node HTTP URL (default: the node running on --data-dir, else the node started last).",
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
DataDirLookupOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir", envvar="P2PCACHE_DATA_DIR", help="Find the node running on this data dir."
    ),
]


def _config(config: Path | None, flags: dict[str, Any]) -> NodeConfig:
    try:
        return load_config(config, os.environ, flags)
    except ConfigError as exc:  # one line: the key, the value, where it came from, why
        raise fail(" ".join(str(exc).split()) + " (see p2pcache node run --help)") from None


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
    mdns: Annotated[
        Optional[bool],
        typer.Option(
            "--mdns/--no-mdns",
            help="Find peers on the local network by mDNS (default: off).",
            show_default=False,
        ),
    ] = None,
    relay_service: Annotated[
        Optional[str],
        typer.Option(
            "--relay-service",
            help="Relay for peers behind NAT: auto (once peers found this node public), on, off "
            f"(default: {_default('relay_service')}).",
        ),
    ] = None,
    reachability: Annotated[
        Optional[bool],
        typer.Option(
            "--reachability/--no-reachability",
            help="Check with peers' dial-backs whether this node is reachable; if not, use a "
            "relay (default: on).",
            show_default=False,
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
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback when the node fails to start.")
    ] = False,
) -> None:
    """Run a node until SIGINT/SIGTERM.

    Settings come from the --config TOML file, then P2PCACHE_* environment variables, then
    these flags (later wins). Every config key has an environment variable:
    P2PCACHE_<KEY> (lists comma-separated). Once serving, the node prints one JSON line with
    "event": "ready" on stdout and writes <data dir>/node.json; logs go to stderr. A node
    that cannot start prints one line saying why and how to fix it, and exits non-zero.
    """
    cfg = _config(
        config,
        _flags(
            data_dir=data_dir,
            listen=listen,
            http=http,
            bootstrap=bootstrap,
            bootstrap_http=bootstrap_http,
            mdns=mdns,
            relay_service=relay_service,
            reachability=reachability,
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
    _serve(cfg, debug)


def _serve(cfg: NodeConfig, debug: bool) -> None:
    import trio

    from p2pcache.logs import setup_node_logging
    from p2pcache.node.daemon import run_node
    from p2pcache.node.preflight import preflight

    try:  # before the model loads: a bad start fails in well under a second
        checked = preflight(cfg)
    except (StartupError, OSError) as exc:  # OSError: e.g. the disk filled up meanwhile
        raise _start_failed(exc, debug) from None
    setup_node_logging(cfg.log_level, cfg.log_format)
    if checked.admin_token_file is not None:
        logging.getLogger("p2pcache.node").warning(
            f"HTTP binds {cfg.http}, not loopback: /admin/* and /metrics need the admin token "
            f"in {checked.admin_token_file} (Authorization: Bearer <token>)"
        )
    try:
        code = trio.run(
            partial(run_node, admin_token_file=checked.admin_token_file), checked.config
        )
    except KeyboardInterrupt:  # a signal before the handlers were installed
        raise typer.Exit(130) from None
    except BaseException as exc:  # exception groups from the nurseries, too
        raise _start_failed(exc, debug) from None
    raise typer.Exit(code)


def _start_failed(exc: BaseException, debug: bool) -> typer.Exit:
    """One line for a known start-up failure; the traceback with --debug, or for a bug."""
    from p2pcache.node.preflight import startup_failure

    message = startup_failure(exc)
    if debug or message is None:
        traceback.print_exception(exc)
    return fail(message or f"the node stopped: {exc!r}", code=1)


run.__doc__ = (run.__doc__ or "").rstrip() + f"\n\n    Environment: {_ENV_HELP}.\n"


def _get(url: str | None, data_dir: Path | None, path: str, token: str | None) -> Any:
    try:
        return admin_get(find_node_url(url, data_dir), path, token_for(url, data_dir, token))
    except NodeUnreachable as exc:
        raise fail(str(exc)) from None


@app.command()
def status(
    url: UrlOpt = None,
    data_dir: DataDirLookupOpt = None,
    admin_token: TokenOpt = None,
    json: JsonOpt = False,
) -> None:
    """Identity, model, addresses, queue and uptime of a running node; its reachability
    (public/private/unknown per address), relays and discovery state."""
    doc = _get(url, data_dir, "/admin/status", admin_token)
    if json:
        print_json(doc)
        return
    keys = (
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
    )
    # Lines, not a table: peer ids and multiaddrs are copied from here whole (any width).
    print_fields([(k, doc.get(k)) for k in keys] + reach_fields(doc))


def _when(ts: Any) -> str:
    import time

    if not isinstance(ts, (int, float)) or ts <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def reach_fields(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """Reachability, relays and discovery of /admin/status as ``key  value`` rows (each part
    only if the node reports it)."""
    rows: list[tuple[str, Any]] = []
    reach = doc.get("reachability")
    if isinstance(reach, dict):
        asked = reach.get("peers") or []
        answered = sum(1 for p in asked if not p.get("error"))
        rows.append(
            (
                "reachability",
                f"{reach.get('status', 'unknown')} (checked {_when(reach.get('checked_at'))}, "
                f"{answered}/{len(asked)} peers answered)",
            )
        )
        per = []
        for addr, v in (reach.get("addrs") or {}).items():
            verdict = {True: "reachable", False: "not reachable", None: "undecided"}.get(
                v.get("reachable"), "?"
            )
            per.append(f"{addr}  {verdict} ({v.get('yes', 0)} dialled, {v.get('no', 0)} not)")
        rows.append(("  per address", per))
    relay = doc.get("relay")
    if isinstance(relay, dict):
        svc = relay.get("service") or {}
        line = f"{'on' if svc.get('on') else 'off'} (mode {svc.get('mode', '?')})"
        if svc.get("on"):
            line += (
                f", {svc.get('reservations', 0)} reservations, {svc.get('circuits', 0)} circuits"
            )
        rows.append(("relay service", line))
        rows.append(
            (
                "relay slots",
                [
                    f"{r.get('relay')} until {_when(r.get('expires'))}"
                    for r in relay.get("reservations") or []
                ],
            )
        )
        rows.append(("relayed addrs", list(relay.get("relayed_addrs") or [])))
        if relay.get("events"):
            rows.append(("relay events", list(relay["events"])[-3:]))
    disc = doc.get("discovery")
    if isinstance(disc, dict):
        items = []
        for k, v in disc.items():
            if k.endswith("_at"):
                shown: Any = _when(v)
            elif isinstance(v, list):
                shown = len(v)  # providers, points: counts here, the list in --json
            elif isinstance(v, dict):
                shown = ", ".join(
                    f"{sk}={_when(sv) if sk == 'at' or sk.endswith(('_at', 'time')) else sv}"
                    for sk, sv in v.items()
                    if not isinstance(sv, (list, dict))
                )
            else:
                shown = v
            items.append(f"{k}: {shown}")
        rows.append(("discovery", items))
    return rows


# `node peers` / `node reputation` are the top-level `peers` / `reputation` commands.
app.command(name="peers")(net.peers)
app.command(name="reputation")(net.reputation)


def print_node_cache_stats(url: str, token: str | None, as_json: bool) -> None:
    """`p2pcache cache stats --url`: the running node's /admin/cache."""
    try:
        doc = admin_get(url, "/admin/cache", token_for(url, None, token))
    except NodeUnreachable as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(doc)
        return
    out_console.print(f"p2pcache node {url}", markup=False, highlight=False)
    keys = (
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
    )
    print_fields([(k, f"{doc.get(k):.1%}" if k == "hit_rate" else doc.get(k)) for k in keys])
