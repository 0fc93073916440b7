"""Checks before a node loads its model: each problem a volunteer can meet at start-up is one
`StartupError` line that says what failed and how to fix it, in well under a second, instead of
a traceback after seconds of model loading.

    preflight(config)        data dir, disk space, model file, HTTP and libp2p ports, and the
                             admin token of a node whose HTTP API is not loopback-only
    startup_failure(exc)     the one line for an error that still ends a start (a race, a
                             disk that filled up meanwhile), found inside exception groups

The checks cannot close every race (a port taken between the check and the bind), so the
daemon turns a failed bind into the same `StartupError`, and `startup_failure` reads it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from p2pcache.api.context import is_loopback
from p2pcache.errors import ConfigError, ModelNotFound, StartupError, StorageError
from p2pcache.net.ports import TcpEndpoint, bind_error, check_listen_addrs, describe_bind_error
from p2pcache.node.config import NodeConfig
from p2pcache.paths import DataDir

MIN_FREE_BYTES = 32 << 20  # the store, identity and model-hash memo start far below this
GGUF_MAGIC = b"GGUF"
_WRITABLE_HINT = "pass --data-dir with a directory you can write to"


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the config to run (with a generated admin token filled in) and
    the token file, when one was generated or reused."""

    config: NodeConfig
    data_dir: DataDir
    admin_token_file: Path | None


def preflight(config: NodeConfig) -> Preflight:
    data_dir = DataDir.resolve(config.data_dir)
    check_data_dir(data_dir.root)
    check_model(config.model)
    check_http(config.http_host, config.http_port)
    check_listen_addrs(config.listen)
    config, token_file = ensure_admin_token(config, data_dir)
    return Preflight(config, data_dir, token_file)


# -- the data dir ------------------------------------------------------------------------------


def check_data_dir(root: Path) -> None:
    """The data dir exists (created if need be), is writable, and its disk has room."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(f"data dir {root} is not a directory; {_WRITABLE_HINT}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StartupError(disk_full_message(root)) from None
        raise StartupError(
            f"data dir {root} cannot be created ({_reason(exc)}); {_WRITABLE_HINT}"
        ) from None
    _check_writable(root)
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise StartupError(disk_full_message(root, free))


def _check_writable(root: Path) -> None:
    # Write a file, not just check permission bits: root ignores those, a read-only mount
    # or a full disk does not.
    probe = root / f".write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"p2pcache" * 512)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StartupError(disk_full_message(root)) from None
        raise StartupError(
            f"data dir {root} is not writable ({_reason(exc)}); fix its permissions or "
            f"{_WRITABLE_HINT}"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # never created, or on a read-only disk
            probe.unlink(missing_ok=True)


def disk_full_message(where: Path | str | None, free: int | None = None) -> str:
    room = (
        f" ({free / 2**20:.1f} MiB free, a node needs {MIN_FREE_BYTES >> 20} MiB)" if free else ""
    )
    place = f" for {where}" if where else ""
    return f"disk full{place}{room}; free some space or pass --data-dir on another disk"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# -- the model -----------------------------------------------------------------------------------


def check_model(model: Path | None) -> None:
    """A configured model is a readable GGUF file (the embedded default is checked by its
    package when it is assembled)."""
    if model is None or str(model) in ("", "default"):
        return
    path = Path(model).expanduser()
    fix = "pass --model with the path of a .gguf file, or leave it out for the embedded model"
    if not path.is_file():
        raise StartupError(f"model file not found: {path}; {fix}")
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise StartupError(f"cannot read the model file {path} ({_reason(exc)}); {fix}") from None
    if magic != GGUF_MAGIC:
        raise StartupError(f"not a GGUF model file: {path} (llama.cpp needs GGUF); {fix}")


# -- ports ---------------------------------------------------------------------------------------


def check_http(host: str, port: int) -> None:
    """The HTTP address can be bound (port 0: any free port, nothing to check)."""
    if port == 0:
        return
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise StartupError(
            f"HTTP address {host}:{port}: unknown host {host!r}; pass --http with an address "
            "of this machine, e.g. 127.0.0.1:8080"
        ) from None
    if (exc := bind_error(TcpEndpoint(host, port))) is not None:
        raise StartupError(http_bind_message(host, port, exc))


def http_bind_message(host: str, port: int, exc: OSError) -> str:
    return (
        f"HTTP address {host}:{port} {describe_bind_error(exc)}; stop the other node, or "
        f"pass --http {host}:<another port> (port 0: any free port)"
    )


# -- the admin token -----------------------------------------------------------------------------


def ensure_admin_token(config: NodeConfig, data_dir: DataDir) -> tuple[NodeConfig, Path | None]:
    """An HTTP API reachable from other machines never serves /admin/* without a token: when
    none is configured, use the one in ``<data dir>/admin.token`` (generated once, mode 0600).
    A loopback-only API needs none (the app refuses non-loopback clients without a token)."""
    if config.admin_token or is_loopback(config.http_host):
        return config, None
    path = data_dir.admin_token
    token = _read_token(path) or _write_token(path)
    return config.model_copy(update={"admin_token": token}), path


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StartupError(
            f"cannot read the admin token {path} ({_reason(exc)}); fix its permissions or "
            "set admin_token"
        ) from None


def _write_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)  # an empty file: replace it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


# -- errors that end a start anyway --------------------------------------------------------------


def startup_failure(exc: BaseException) -> str | None:
    """The one line for a known start-up failure inside ``exc`` (an exception group from the
    node's nurseries, usually), or None for a bug (the caller shows the traceback then)."""
    for e in _leaves(exc):
        if isinstance(e, (StartupError, ConfigError)):
            return " ".join(str(e).split())
        if isinstance(e, ModelNotFound):
            return f"{e}; pass --model with the path of a .gguf file"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return disk_full_message(e.filename)
        if isinstance(e, StorageError) and "disk full" in str(e):
            return disk_full_message(None)
        if type(e).__name__ == "OpenConnectionError":  # py-libp2p could not listen
            return f"libp2p cannot listen: {e}; check --listen"
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc``, depth first, with their causes (a wrapped OSError counts)."""
    out: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
            continue
        out.append(e)
        if e.__cause__ is not None:
            stack.insert(0, e.__cause__)
    return out
