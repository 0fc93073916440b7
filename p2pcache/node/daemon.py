"""The node daemon: one trio process with the HTTP API, the backend worker and the libp2p
service, all in one nursery. Its parts come from the composition root (`p2pcache.node.build`).

Lifecycle:
1. SIGINT/SIGTERM handling starts first, so a signal during model loading exits cleanly.
2. The model loads off the event loop; the store opens; bootstrap_http nodes are asked for
   their addresses (bounded wait). Then the network and the resolver are built.
3. The network service starts (``nursery.start``), then HTTP; once HTTP listens the node
   prints one JSON "ready" line on stdout and writes ``<data dir>/node.json`` and the CLI's
   ``last-node.json`` (how `p2pcache node status` & co. find it without flags). A port taken
   meanwhile ends the start with a one-line `StartupError` (`p2pcache.node.preflight`).
4. On the first signal the node drains: new API requests get 503, queued requests for the
   model get 503, the running generation finishes and is stored, in-flight responses are
   sent (up to ``shutdown_timeout_s``). Then the network stops and LMDB closes.
   A second signal cancels everything at once (LMDB still closes cleanly).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from p2pcache.api import NodeContext, create_app
from p2pcache.errors import StartupError
from p2pcache.logs import fields
from p2pcache.metrics import NodeMetrics
from p2pcache.net.host import load_psk
from p2pcache.node.build import (
    NetworkBuilder,
    api_settings,
    build_resolver,
    local_network,
    net_config,
    node_options,
    open_local,
)
from p2pcache.node.config import NodeConfig
from p2pcache.node.preflight import http_bind_message
from p2pcache.paths import last_node_path
from p2pcache.version import __version__

log = logging.getLogger("p2pcache.node")

READY_EVENT = "ready"


def node_info_path(data_dir: Path) -> Path:
    return data_dir / "node.json"


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def record_last_node(ready: dict[str, Any]) -> None:
    """Tell the CLI where this node runs (`p2pcache.paths.last_node_path`). Best effort: a
    home dir the node cannot write only costs the user a --data-dir flag."""
    path = last_node_path()
    keep = ("http", "data_dir", "pid", "peer_id", "admin_token_file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, {k: ready[k] for k in keep if ready.get(k) is not None})
    except OSError as exc:
        log.warning(
            "cannot record the node for the CLI", extra=fields(path=str(path), error=str(exc))
        )


def _first_os_error(group: BaseExceptionGroup[OSError]) -> OSError:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, OSError)
    return first


def _reachable(addrs: list[str], url: str) -> list[str]:
    """The addrs worth dialing: a node reached at a non-loopback URL (another container or
    host) is not reached at its 127.0.0.1 addresses, which would dial ourselves."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return addrs
    remote = [a for a in addrs if not a.startswith("/ip4/127.")]
    return remote or addrs


async def resolve_bootstrap_http(urls: list[str], deadline_s: float) -> list[str]:
    """The ``addrs`` of each node at ``urls`` (its open ``/p2p``, so no admin token is needed),
    polling until each answers or the deadline passes. A node without the network layer has no
    addrs: warned, skipped."""
    found: list[str] = []
    if not urls:
        return found
    with trio.move_on_after(deadline_s) as scope:
        async with httpx.AsyncClient(timeout=5.0) as client:
            for url in urls:
                while True:
                    try:
                        r = await client.get(f"{url}/p2p")
                        if r.status_code == 200:
                            addrs = _reachable(r.json().get("addrs") or [], url)
                            if not addrs:
                                log.warning(
                                    "bootstrap node has no p2p addresses (no network layer?)",
                                    extra=fields(url=url),
                                )
                            found.extend(addrs)
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.5)  # retry interval while the bootstrap node starts
    if scope.cancelled_caught:
        log.warning(
            "gave up waiting for bootstrap nodes", extra=fields(urls=urls, waited_s=deadline_s)
        )
    return found


async def run_node(
    config: NodeConfig,
    network: NetworkBuilder = local_network,
    *,
    ready_out: Any = None,
    install_signal_handlers: bool = True,
    admin_token_file: Path | None = None,
) -> int:
    """Run a node until SIGINT/SIGTERM. Returns the process exit code (0: clean shutdown).
    ``network`` builds the node's network from its local parts (tests pass one that lies).
    ``admin_token_file``: where a generated admin token is (named in the ready line)."""
    ready_out = ready_out or sys.stdout
    stop = trio.Event()  # first signal: drain
    signals_seen = 0

    async with trio.open_nursery() as outer:
        cancel_all = outer.cancel_scope

        async def watch_signals(
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            nonlocal signals_seen
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    signals_seen += 1
                    name = signal.Signals(signum).name
                    if signals_seen == 1:
                        log.info("shutting down (drain)", extra=fields(signal=name))
                        stop.set()
                    else:
                        log.warning("second signal: stopping now", extra=fields(signal=name))
                        cancel_all.cancel()

        if install_signal_handlers:
            await outer.start(watch_signals)
        # A second signal cancels `_run` from outside: it still closes LMDB (shielded) before
        # the cancellation ends here, so the forced stop is clean too and keeps exit code 0.
        code = 0
        code = await _run(config, network, stop, ready_out, admin_token_file)
        outer.cancel_scope.cancel()
    return code


async def _run(
    config: NodeConfig,
    network: NetworkBuilder,
    stop: trio.Event,
    ready_out: Any,
    admin_token_file: Path | None = None,
) -> int:
    t0 = time.perf_counter()
    # Loading blocks for seconds: off the loop, so signals are still noticed. Shielded, so a
    # forced stop during loading still gets the opened parts back and closes them below.
    with trio.CancelScope(shield=True):
        local = await trio.to_thread.run_sync(
            open_local, node_options(config), abandon_on_cancel=False
        )
    info_file = node_info_path(local.data_dir.root)
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        if stop.is_set():
            return 0
        model_path = local.backend.config.model_path
        model_id = config.model_name or model_path.stem
        log.info(
            "model loaded",
            extra=fields(
                model=model_id,
                model_hash=local.model_hash,
                peer_id=local.identity.peer_id,
                data_dir=str(local.data_dir.root),
                load_s=round(time.perf_counter() - t0, 2),
            ),
        )
        bootstrap = list(config.bootstrap)
        if config.bootstrap_http:
            async with trio.open_nursery() as waiter:  # a signal ends the wait, too

                async def _resolve() -> None:
                    bootstrap.extend(
                        await resolve_bootstrap_http(config.bootstrap_http, config.bootstrap_wait_s)
                    )
                    waiter.cancel_scope.cancel()

                async def _stop() -> None:
                    await stop.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(_resolve)
                waiter.start_soon(_stop)
        if stop.is_set():
            return 0

        metrics = NodeMetrics()
        net = network(local, net_config(config, bootstrap, load_psk(local.data_dir.root)), metrics)
        ctx = NodeContext(
            settings=api_settings(config),
            resolver=build_resolver(local, net),
            store=local.store,
            worker=local.worker,
            peer_id=local.identity.peer_id,
            model_hash=local.model_hash,
            model_id=model_id,
            model_path=model_path,
            n_ctx=local.backend.config.n_ctx,
            data_dir=local.data_dir.root,
            metrics=metrics,
            network=net.service,
            bootstrap=bootstrap,
        )
        app = create_app(ctx)
        hc = HypercornConfig()
        hc.bind = [config.http]
        hc.graceful_timeout = config.shutdown_timeout_s
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        hc.keep_alive_timeout = 30

        async with trio.open_nursery() as nursery:
            await nursery.start(net.service.run)
            server_done = trio.Event()

            async def http_server(
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                try:
                    await hypercorn_serve(
                        app, hc, shutdown_trigger=stop.wait, task_status=task_status, mode="asgi"
                    )
                finally:
                    server_done.set()

            try:
                binds = await nursery.start(http_server)
            except* OSError as group:  # taken since the preflight check: one line, no traceback
                exc = _first_os_error(group)
                message = http_bind_message(config.http_host, config.http_port, exc)
                raise StartupError(message) from None
            ctx.http_urls = list(binds)
            ready = {
                "event": READY_EVENT,
                "http": ctx.http_urls[0] if ctx.http_urls else None,
                "http_urls": ctx.http_urls,
                "peer_id": local.identity.peer_id,
                "model": model_id,
                "model_hash": local.model_hash,
                "addrs": net.service.addrs(),
                "data_dir": str(local.data_dir.root),
                "pid": os.getpid(),
                "version": __version__,
                "admin_token_file": str(admin_token_file) if admin_token_file else None,
            }
            _write_atomic(info_file, ready)
            record_last_node(ready)
            print(json.dumps(ready), file=ready_out, flush=True)
            log.info("node ready", extra=fields(**{k: v for k, v in ready.items() if k != "event"}))

            async def drain_on_stop() -> None:
                await stop.wait()
                ctx.draining = True
                local.worker.close()  # queued model calls fail with 503; the running one finishes

            nursery.start_soon(drain_on_stop)
            # hypercorn returns after stop is set and in-flight requests have finished
            # (or shutdown_timeout_s passed); then stop everything else.
            await server_done.wait()
            nursery.cancel_scope.cancel()
        return 0
    finally:
        info_file.unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                local.close
            )  # flush hit counters, close LMDB and the model
        log.info("shutdown complete", extra=fields(peer_id=local.identity.peer_id))
