"""The libp2p host of a node: persistent Ed25519 identity, Noise + yamux only, optional PSK.

py-libp2p's `new_host` defaults offer plaintext, secio and TLS next to Noise and mplex next to
yamux; a node here negotiates exactly Noise and yamux, so no connection is ever unencrypted.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2PPrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pcache.identity import Identity
from p2pcache.net.config import DEFAULT_LISTEN, DIAL_TIMEOUT_S, ConnLimits
from p2pcache.net.conn_limits import connection_config, guard_host
from p2pcache.net.ports import check_listen_addrs

log = logging.getLogger(__name__)

PSK_ENV = "P2PCACHE_PSK"


def key_pair_from_identity(identity: Identity) -> KeyPair:
    """The libp2p key pair of the node's identity (same seed, so the same peer id)."""
    private = P2PPrivateKey.new(identity.seed)
    key_pair = KeyPair(private, private.get_public_key())
    if ID.from_pubkey(key_pair.public_key).to_base58() != identity.peer_id:
        raise RuntimeError("libp2p peer id does not match the identity's peer id")
    return key_pair


def parse_psk(psk: str | bytes | None) -> str | None:
    """A pre-shared swarm key as py-libp2p wants it: 64 hex characters (32 bytes)."""
    if psk is None or psk == "" or psk == b"":
        return None
    if isinstance(psk, bytes):
        if len(psk) != 32:
            raise ValueError("a pre-shared key is 32 bytes")
        return psk.hex()
    text = psk.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError("a pre-shared key is 64 hex characters") from exc
    if len(raw) != 32:
        raise ValueError("a pre-shared key is 64 hex characters")
    return raw.hex()


def load_psk(data_dir: Path | None) -> str | None:
    """``$P2PCACHE_PSK`` (64 hex), else ``<data dir>/swarm.key`` if present, else None."""
    if v := os.environ.get(PSK_ENV):
        return v.strip()
    if data_dir is not None and (p := Path(data_dir) / "swarm.key").is_file():
        return p.read_text().strip()
    return None


@dataclass(frozen=True)
class HostConfig:
    """What the host itself needs (dialing is `p2pcache.net.peers`' job)."""

    listen: Sequence[str] = (DEFAULT_LISTEN,)
    psk: str | None = None  # 64 hex chars: only peers with the same key can connect
    conn: ConnLimits = ConnLimits()  # inbound limits (`p2pcache.net.conn_limits`)


def build_host(identity: Identity, config: HostConfig) -> IHost:
    key_pair = key_pair_from_identity(identity)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen],
        psk=parse_psk(config.psk),
        connection_config=connection_config(config.conn),
    )


def _local_ipv4() -> list[str]:
    """This machine's IPv4 addresses by its host name (a container's address on its compose
    network), non-loopback first, then 127.0.0.1."""
    try:
        found = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        found = set()
    return sorted(a for a in found if not a.startswith("127.")) + ["127.0.0.1"]


def full_addrs(host: IHost) -> list[str]:
    """Dialable addresses of a running host, each ending in /p2p/<peer id>.

    A listener on 0.0.0.0 is not dialable (dialing it reaches the dialer itself): it is
    announced as each local IPv4 address instead, so adverts and /admin/status give peers
    addresses that reach this node."""
    pid = host.get_id().to_base58()
    out = []
    for a in host.get_addrs():
        s = str(a)
        s = s if "/p2p/" in s else f"{s}/p2p/{pid}"
        if s.startswith("/ip4/0.0.0.0/"):
            out += [f"/ip4/{ip}/" + s.removeprefix("/ip4/0.0.0.0/") for ip in _local_ipv4()]
        else:
            out.append(s)
    return out


class _QuietTcpDialErrors(logging.Filter):
    """py-libp2p logs every refused TCP dial as an ERROR ("Failed to open TCP stream") before
    raising; `dial` says the same in one line of its own, so that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to open TCP stream")


_TCP_LOG = logging.getLogger("libp2p.transport.tcp.tcp")
if not any(isinstance(f, _QuietTcpDialErrors) for f in _TCP_LOG.filters):
    _TCP_LOG.addFilter(_QuietTcpDialErrors())


def dial_error(exc: BaseException) -> str:
    """The innermost reason of a dial failure (py-libp2p nests them in groups and chains)."""
    for _ in range(16):  # bounded: a pathological chain ends the walk
        errors = getattr(exc, "errors", None)  # py-libp2p's MultiError
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(errors, (list, tuple)) and errors and isinstance(errors[-1], Exception):
            exc = errors[-1]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def dial(host: IHost, addr: str, timeout_s: float = DIAL_TIMEOUT_S) -> PeerInfo:
    """Connect to ``addr`` (ending in /p2p/<peer id>) within ``timeout_s``; on failure one log
    line and the exception (TooSlowError, or py-libp2p's)."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    try:
        with trio.fail_after(timeout_s):
            await host.connect(info)
    except trio.TooSlowError:
        log.info("dial %s: no connection within %.1f s", addr, timeout_s)
        raise
    except Exception as exc:
        log.info("dial %s failed: %s", addr, dial_error(exc))
        raise
    return info


@asynccontextmanager
async def running_host(identity: Identity, config: HostConfig) -> AsyncIterator[IHost]:
    """A started host listening on ``config.listen``; closed (all connections) on exit.
    StartupError if a listen port is taken: py-libp2p would share it silently (ports.py)."""
    check_listen_addrs(config.listen)  # right before listening: the smallest race window
    host = build_host(identity, config)
    guard_host(host, config.conn)  # before it listens: every inbound connection is admitted
    async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen]):
        try:
            yield host
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await host.close()
