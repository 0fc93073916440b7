"""Node configuration: TOML < environment < flags, validated with clear errors (no model)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p2pcache.node.config import ConfigError, load_config, parse_size

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    toml = write(
        tmp_path,
        'http = "0.0.0.0:9000"\nmax_queue = 5\nshare_by_default = true\n'
        'data_dir = "data"\nlog_format = "text"\nsize_cap = "2GiB"\n',
    )
    env = {
        "P2PCACHE_MAX_QUEUE": "7",
        "P2PCACHE_HTTP": "127.0.0.1:9001",
        "P2PCACHE_BOOTSTRAP": (
            "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
        ),
        "UNRELATED": "x",
        "P2PCACHE_CUDA": "1",
    }
    cfg = load_config(toml, env, {"http": "127.0.0.1:0", "max_queue": None})
    assert cfg.http == "127.0.0.1:0"  # flag beats env beats TOML
    assert cfg.max_queue == 7  # env beats TOML; an unset flag (None) does not count
    assert cfg.share_by_default is True and cfg.log_format == "text"  # TOML only
    assert cfg.size_cap == 2 * 2**30
    assert cfg.data_dir == (tmp_path / "data").resolve()  # relative to the config file
    assert cfg.bootstrap[0].endswith("Xo") and cfg.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert load_config(None, {}, {}).share_by_default is False  # private unless set


def test_config_file_from_env_and_defaults(tmp_path: Path) -> None:
    toml = write(tmp_path, "max_queue = 3\n")
    assert load_config(None, {"P2PCACHE_CONFIG": str(toml)}, {}).max_queue == 3
    assert load_config(
        None,
        {
            "P2PCACHE_SHARE_BY_DEFAULT": "yes",
            "P2PCACHE_LISTEN": "/ip4/1.2.3.4/tcp/1, /ip4/1.2.3.4/udp/1/quic-v1",
        },
        {},
    ).listen == ["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/udp/1/quic-v1"]


@pytest.mark.parametrize(
    ("toml", "env", "flags", "expected"),
    [
        ('htp = "1:2"\n', {}, {}, "unknown key 'htp' (did you mean 'http'?)"),
        ('http = "localhost"\n', {}, {}, "http = 'localhost' (from "),
        ("", {"P2PCACHE_HTTP": "nohost:99999"}, {}, "(from env P2PCACHE_HTTP): expected HOST:PORT"),
        ("", {}, {"listen": ["not-a-multiaddr"]}, "(from --listen): not a multiaddr"),
        ("", {}, {"bootstrap": ["/ip4/1.2.3.4/tcp/4001"]}, "must end in /p2p/<peer id>"),
        ('max_queue = "lots"\n', {}, {}, "max_queue = 'lots'"),
        ("max_queue = -1\n", {}, {}, "greater than or equal to 0"),
        (
            "",
            {"P2PCACHE_SHARE_BY_DEFAULT": "maybe"},
            {},
            "P2PCACHE_SHARE_BY_DEFAULT='maybe': expected true or false",
        ),
        ('size_cap = "lots"\n', {}, {}, "expected a size such as 4GiB"),
        ('log_level = "loud"\n', {}, {}, "log_level = 'loud'"),
        ("http = [\n", {}, {}, "is not valid TOML"),
        ("[http]\nport = 1\n", {}, {}, "'http' must be a value, not a [table]"),
        ("", {}, {"bootstrap_http": ["ftp://x"]}, "expected an http:// URL"),
    ],
)
def test_invalid_config_names_key_value_and_source(
    tmp_path: Path, toml: str, env: dict, flags: dict, expected: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, toml), env, flags)
    assert expected in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", {}, {})


def test_sizes() -> None:
    assert (
        parse_size("512MB") == 512 * 10**6
        and parse_size("1 MiB") == 2**20
        and parse_size(100) == 100
    )
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_example_node_toml_is_valid() -> None:
    cfg = load_config(REPO / "node" / "node.toml", {}, {})
    assert cfg.http == "0.0.0.0:8080" and cfg.share_by_default is False


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "p2pcache", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_bad_config_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    bad = write(tmp_path, 'http = "localhost"\nmax_qeue = 3\n')
    r = run_cli("node", "run", "--config", str(bad))
    assert (
        r.returncode == 2
        and "unknown key 'max_qeue'" in r.stderr
        and "did you mean 'max_queue'" in r.stderr
    )
    r = run_cli("node", "run", "--http", "nowhere")
    assert r.returncode == 2 and "http = 'nowhere' (from --http)" in r.stderr


def test_cli_print_config_merges_sources(tmp_path: Path) -> None:
    toml = write(tmp_path, "max_queue = 3\nn_ctx = 2048\n")
    r = run_cli(
        "node",
        "run",
        "--config",
        str(toml),
        "--n-ctx",
        "4096",
        "--print-config",
        env={"P2PCACHE_MAX_QUEUE": "9"},
    )
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    assert doc["max_queue"] == 9 and doc["n_ctx"] == 4096 and doc["http"] == "127.0.0.1:8080"


def test_cli_help_lists_flags_and_env() -> None:
    r = run_cli("node", "run", "--help")
    assert r.returncode == 0
    for text in (
        "--config",
        "--data-dir",
        "--listen",
        "--http",
        "--bootstrap",
        "--model",
        "P2PCACHE_MAX_QUEUE",
    ):
        assert text in r.stdout, text


def test_bootstrap_addrs_of_a_remote_node_skip_its_loopback() -> None:
    from p2pcache.node.daemon import _reachable

    pid = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    both = [f"/ip4/172.18.0.2/tcp/4001/p2p/{pid}", f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"]
    # another container: its 127.0.0.1 would dial ourselves
    assert _reachable(both, "http://bootstrap:8080") == both[:1]
    # the same host: loopback is the way in
    assert _reachable(both, "http://127.0.0.1:18080") == both
    assert _reachable(both[1:], "http://bootstrap:8080") == both[1:]  # nothing better: keep it


def test_a_wildcard_listener_is_announced_as_dialable_addresses() -> None:
    import trio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pcache.identity import Identity
    from p2pcache.net.host import HostConfig, full_addrs, running_host

    async def main() -> list[str]:
        ident = Identity(Ed25519PrivateKey.generate())
        async with running_host(ident, HostConfig(listen=("/ip4/0.0.0.0/tcp/0",))) as host:
            return full_addrs(host)

    addrs = trio.run(main)
    assert addrs and not any("/0.0.0.0/" in a for a in addrs)
    assert addrs[-1].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in addrs[-1]
