"""A volunteer's first hour: start-up failures are one line, the admin API is safe by default,
and the CLI finds the node it started (with a custom data dir) without flags."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from rich.console import Console

from p2pcache.api import create_app
from p2pcache.api.context import is_loopback
from p2pcache.errors import StartupError
from p2pcache.net.ports import check_listen_addrs
from p2pcache.node.cluster import NodeProcess, start_node, stop_all
from p2pcache.node.config import load_config
from p2pcache.node.preflight import ensure_admin_token, startup_failure
from p2pcache.paths import DataDir
from tests.test_api_units import context

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
RUN_TIMEOUT_S = 120  # a start that does not fail at once would run forever: bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_run(tmp_path: Path, *args: str, data_dir: Path | None = None) -> str:
    """``p2pcache node run`` that must fail: its one stderr line (asserted to be one line)."""
    base = [
        "--data-dir",
        str(data_dir or tmp_path / "data"),
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "p2pcache", "node", "run", *base, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    mounted: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        opts = ",".join(options)
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True)
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- every start-up failure is one line --------------------------------------------------------


def test_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = node_run(tmp_path, "--http", f"127.0.0.1:{port}")
    assert line == (
        f"HTTP address 127.0.0.1:{port} is in use (another node or program listens there); "
        f"stop the other node, or pass --http 127.0.0.1:<another port> (port 0: any free port)"
    )


def test_libp2p_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = node_run(tmp_path, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert line.startswith(f"libp2p listen address /ip4/127.0.0.1/tcp/{port} is in use")
    assert "pass --listen with another port" in line


def test_data_dir_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    data_dir = tmp_path / "a-file" / "data"
    line = node_run(tmp_path, data_dir=data_dir)
    assert line == (
        f"data dir {data_dir} cannot be created (Not a directory); "
        "pass --data-dir with a directory you can write to"
    )


def test_data_dir_not_writable(tmp_path: Path, tmpfs: Any) -> None:
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount stops it
        data_dir = tmpfs("ro", "ro", "size=1m")
        reason = "Read-only file system"
    else:
        data_dir = tmp_path / "locked"
        data_dir.mkdir()
        data_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
        reason = "Permission denied"
    line = node_run(tmp_path, data_dir=data_dir)
    assert line == (
        f"data dir {data_dir} is not writable ({reason}); fix its permissions or "
        "pass --data-dir with a directory you can write to"
    )


@needs_root
def test_disk_full(tmp_path: Path, tmpfs: Any) -> None:
    data_dir = tmpfs("tiny", "size=1m")
    line = node_run(tmp_path, data_dir=data_dir)
    assert line.startswith(f"disk full for {data_dir} (")
    assert line.endswith("free some space or pass --data-dir on another disk")


def test_bad_config_values(tmp_path: Path) -> None:
    line = node_run(tmp_path, "--n-ctx", "12")
    assert line == (
        "invalid node configuration: n_ctx = 12 (from --n-ctx): Input should be greater than "
        "or equal to 256 (see p2pcache node run --help)"
    )
    toml = tmp_path / "node.toml"
    toml.write_text('htp = "127.0.0.1:8080"\n')
    line = node_run(tmp_path, "--config", str(toml))
    assert line.startswith(f"{toml}: unknown key 'htp' (did you mean 'http'?)")


def test_model_missing_or_not_gguf(tmp_path: Path) -> None:
    fix = "pass --model with the path of a .gguf file, or leave it out for the embedded model"
    missing = tmp_path / "nope.gguf"
    assert node_run(tmp_path, "--model", str(missing)) == f"model file not found: {missing}; {fix}"
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"hello, not a model")
    line = node_run(tmp_path, "--model", str(not_gguf))
    assert line == f"not a GGUF model file: {not_gguf} (llama.cpp needs GGUF); {fix}"


def test_errors_inside_exception_groups_are_one_line() -> None:
    """What ends a start after the checks (a race, a disk filling meanwhile) is found inside
    the nurseries' exception groups; a bug is not dressed up as a start-up failure."""
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [StartupError("port\ntaken")])])
    assert startup_failure(nested) == "port taken"
    enospc = OSError(errno.ENOSPC, "No space left on device", "/data/store/data.mdb")
    assert startup_failure(ExceptionGroup("g", [enospc])) == (
        "disk full for /data/store/data.mdb; free some space or pass --data-dir on another disk"
    )
    assert startup_failure(ExceptionGroup("g", [KeyError("bug")])) is None


# -- two nodes on one libp2p port --------------------------------------------------------------


def test_a_reuseport_listener_is_seen_as_taken() -> None:
    """py-libp2p listens with SO_REUSEPORT, so a second one would share the port silently;
    the probe (without SO_REUSEPORT) sees the port as taken."""
    with socket.socket() as first:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        with socket.socket() as second:  # what py-libp2p would do: it succeeds
            second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            second.bind(("127.0.0.1", port))
        with pytest.raises(StartupError, match=f"/ip4/127.0.0.1/tcp/{port} is in use"):
            check_listen_addrs([f"/ip4/127.0.0.1/tcp/{port}"])
    check_listen_addrs(["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/4001/quic"])  # nothing fixed


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A real node on a custom data dir, HTTP on every interface (so it generates its admin
    token) and a fixed libp2p port."""
    data_dir = tmp_path_factory.mktemp("custom") / "my-node"
    n = start_node(
        "custom",
        data_dir,
        http="0.0.0.0:0",
        listen=f"/ip4/127.0.0.1/tcp/{free_port()}",
        extra=("--log-level", "warning"),
    )
    yield n
    assert stop_all([n]) == {"custom": 0}


@pytest.mark.model
def test_second_node_on_the_same_libp2p_port_refuses_to_start(
    node: NodeProcess, tmp_path: Path
) -> None:
    listen = node.ready["addrs"][0].split("/p2p/")[0]
    line = node_run(tmp_path, "--listen", listen, data_dir=tmp_path / "second")
    assert line.startswith(f"libp2p listen address {listen} is in use")
    assert httpx.get(f"{node.url}/healthz", timeout=10).status_code == 200  # the first serves


# -- the admin API is safe by default ----------------------------------------------------------


_apps: dict[int, Any] = {}


def admin_call(ctx: Any, path: str, client: str, token: str | None = None) -> int:
    app = _apps.get(id(ctx)) or _apps.setdefault(id(ctx), create_app(ctx))  # one app per node
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def go() -> int:
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            return (await http.get(path, headers=headers)).status_code

    return trio.run(go)


@pytest.mark.parametrize("path", ["/admin/status", "/admin/peers", "/admin/reputation", "/metrics"])
def test_admin_refuses_a_remote_client_without_a_token(tmp_path: Path, path: str) -> None:
    open_ctx = context(tmp_path)
    assert admin_call(open_ctx, path, "203.0.113.9") == 403
    assert admin_call(open_ctx, path, "::ffff:198.51.100.1") == 403
    assert admin_call(open_ctx, path, "127.0.0.1") == 200
    assert admin_call(open_ctx, path, "::1") == 200
    guarded = context(tmp_path, admin_token="s3cret")
    assert admin_call(guarded, path, "203.0.113.9") == 401
    assert admin_call(guarded, path, "203.0.113.9", token="wrong") == 401
    assert admin_call(guarded, path, "203.0.113.9", token="s3cret") == 200


def test_open_endpoints_stay_open(tmp_path: Path) -> None:
    ctx = context(tmp_path, admin_token="s3cret")
    assert admin_call(ctx, "/healthz", "203.0.113.9") == 200
    assert admin_call(ctx, "/p2p", "203.0.113.9") == 200  # bootstrap_http reads this


def test_a_public_bind_without_a_token_gets_a_generated_one(tmp_path: Path) -> None:
    dd = DataDir(tmp_path)
    public = load_config(None, {}, {"http": "0.0.0.0:8080", "data_dir": tmp_path})
    cfg, path = ensure_admin_token(public, dd)
    assert path == dd.admin_token and cfg.admin_token and len(cfg.admin_token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_admin_token(public, dd)[0].admin_token == cfg.admin_token  # reused
    local = load_config(None, {}, {"http": "127.0.0.1:8080"})
    assert ensure_admin_token(local, dd) == (local, None)
    mine = load_config(None, {}, {"http": "0.0.0.0:8080", "admin_token": "mine"})
    assert ensure_admin_token(mine, dd) == (mine, None)
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_the_shipped_config_and_the_doc_agree() -> None:
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "node" / "node.toml", {}, {})
    assert not is_loopback(cfg.http_host) and cfg.admin_token is None  # so: a generated token
    doc = (repo / "docs" / "run-a-public-node.md").read_text()
    assert "admin.token" in doc and "127.0.0.1:8080" in doc


@pytest.mark.model
def test_the_running_public_node_needs_its_token(node: NodeProcess) -> None:
    token_file = Path(node.ready["admin_token_file"])
    assert token_file == DataDir(node.data_dir).admin_token
    token = token_file.read_text().strip()
    url = node.url.replace("0.0.0.0", "127.0.0.1")
    assert httpx.get(f"{url}/admin/status", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{url}/admin/status", headers=auth, timeout=10).status_code == 200
    p2p = httpx.get(f"{url}/p2p", timeout=10).json()
    assert p2p["peer_id"] == node.peer_id and p2p["addrs"] == node.ready["addrs"]


# -- the CLI finds the node it started ---------------------------------------------------------


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: no --data-dir, no --url, no token in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("P2PCACHE_DATA_DIR", "COLUMNS")}
    env["XDG_DATA_HOME"] = str(tmp_path / "empty-default")  # the default data dir has nothing
    env.pop("P2PCACHE_ADMIN_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "p2pcache", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.model
def test_cli_finds_the_node_started_with_a_custom_data_dir(
    node: NodeProcess, tmp_path: Path
) -> None:
    status = json.loads(cli(tmp_path, "node", "status", "--json").stdout)
    assert status["peer_id"] == node.peer_id and status["data_dir"] == str(node.data_dir)
    peers = json.loads(cli(tmp_path, "peers", "--json").stdout)
    assert peers["peer_id"] == node.peer_id and peers["peers"] == []
    rep = json.loads(cli(tmp_path, "node", "reputation", "--json").stdout)
    assert rep["peer_id"] == node.peer_id
    stats = json.loads(cli(tmp_path, "cache", "stats", "--json").stdout)
    assert stats["path"] == str(node.data_dir / "store")
    # In a pipe, status is one line per value: every multiaddr whole, on a line of its own.
    lines = cli(tmp_path, "node", "status").stdout.splitlines()
    for addr in node.ready["addrs"]:
        assert any(line.split()[-1:] == [addr] for line in lines), lines
    assert any(line.split() == ["peer_id", node.peer_id] for line in lines)


# -- 80 columns, and pipes ---------------------------------------------------------------------

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
ADDR = f"/ip4/203.0.113.77/tcp/4001/p2p/{PEER}"


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The CLI's stdout as an 80-column pipe."""
    from p2pcache.cli import common, demo, net

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=False)
    for mod in (common, net, demo):
        monkeypatch.setattr(mod, "out_console", console)
    return buf


def test_peers_and_reputation_keep_ids_and_addrs_whole(
    narrow: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pcache.cli import net

    row = {"peer_id": PEER, "score": 0.5, "mesh": True, "addrs": [ADDR], "successes": 2.0}
    doc = {"peer_id": PEER[::-1], "peers": [row], "stats": {}}
    monkeypatch.setattr(net, "_online", lambda *a: doc)
    net.peers(None, None, None, False)
    net.reputation(None, None, None, None, False, None)
    lines = narrow.getvalue().splitlines()
    assert lines.count(PEER) == 2 and any(line.split()[-1:] == [ADDR] for line in lines)
    assert all(len(line) <= 80 for line in lines if ADDR not in line)


def test_demo_answers_do_not_wrap_one_word_per_line(narrow: io.StringIO) -> None:
    from p2pcache.cli.demo import _print_answers

    answer = "A cache keeps copies of data close to where it is needed, so it is fast."
    x = {"timings": {"completion_tokens": 24}, "single_flight": False}
    rows = [("node-1", "Q1", "q", {"level": "L3", "ms": 812.3, "text": answer, "x": x})]
    _print_answers(rows)
    lines = narrow.getvalue().splitlines()
    assert any("L3 computed" in line and "24 tokens" in line for line in lines)
    assert any(line.strip() == answer for line in lines)
    assert all(len(line) <= 80 for line in lines)
