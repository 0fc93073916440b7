"""Reachability: can peers dial us at the addresses we advertise? (`/otd/reach/1.0.0`)

py-libp2p's AutoNAT v1 answers "reachable" for any address once the requester is connected:
its dial-back is ``host.connect()``, which returns at once when a connection to the requester
already exists (and the requester is always connected, it just asked). So a dial-back here
never uses the serving node's host: it opens a fresh host with a throw-away identity, which
has no connection to anybody, dials the claimed address with Noise expecting the requester's
peer id, and closes. A dial-back succeeds only if something that holds the requester's key
listens at that address.

The exchange is one msgpack frame each way (`p2pcache.net.wire`), both size-limited, inside
one deadline:

- request ``{"addrs": [multiaddr, ...]}`` (at most `ReachConfig.max_addrs`);
- response ``{"results": {addr: {"ok": bool, "why": str}}}``.

Not an amplifier: the server dials only ``/ip4/<ip>/tcp/<port>`` addresses whose IP is the IP
the request came from (a requester cannot aim dial-backs at a third party), at most one
request per peer per `ReachConfig.per_peer_interval_s`, and at most
`ReachConfig.max_concurrent` dial-backs at a time in all. Refused requests are answered with
the reason (``rate``, ``busy``), refused addresses with ``ip_mismatch`` / ``unsupported``.

The asking side (`ReachabilityChecker`) asks a few connected peers and combines their answers:
an address is reachable when at least `ReachConfig.quorum` peers dialled it; the node is
``public`` when some address is, ``private`` when at least ``quorum`` peers answered and every
address failed at ``quorum`` of them, else ``unknown``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pcache.identity import Identity
from p2pcache.net.config import ReachConfig
from p2pcache.net.host import HostConfig, build_host
from p2pcache.net.wire import FrameReader, pack_msg

log = logging.getLogger(__name__)

REACH_PROTOCOL = TProtocol("/otd/reach/1.0.0")
MAX_FRAME = 8 * 1024
MAX_ADDR_LEN = 256

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


# -- the serving side ---------------------------------------------------------------------


@dataclass
class ReachServerStats:
    requests: int = 0
    refused_rate: int = 0
    refused_busy: int = 0
    dialed_ok: int = 0
    dialed_failed: int = 0
    ip_mismatch: int = 0
    bad_requests: int = 0


def dial_target(addr: str, requester: str, observed_ip: str | None) -> tuple[str | None, str]:
    """(the address to dial, "") or (None, why not). Only /ip4/<ip>/tcp/<port>[/p2p/<id>]
    with ``ip`` equal to the requester's observed IP and a ``/p2p`` part, if any, naming the
    requester."""
    if len(addr) > MAX_ADDR_LEN:
        return None, "unsupported"
    try:
        ma = multiaddr.Multiaddr(addr)
        names = [p.name for p in ma.protocols()]
        if names not in (["ip4", "tcp"], ["ip4", "tcp", "p2p"]):
            return None, "unsupported"
        ip, port = ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
        pid = ma.value_for_protocol("p2p") if "p2p" in names else requester
    except Exception:
        return None, "unsupported"
    if pid != requester:
        return None, "wrong_peer"
    if observed_ip is None or ip != observed_ip:
        return None, "ip_mismatch"
    if not 0 < port < 65536:
        return None, "unsupported"
    return f"/ip4/{ip}/tcp/{port}", ""


async def fresh_dial(peer_id: str, addr: str, timeout_s: float, psk: str | None) -> str:
    """Dial ``addr`` from a new host with a throw-away identity; "" on success, else why.
    The new host has no connections, so an existing connection cannot answer for the
    address; Noise checks that the far end holds ``peer_id``'s key."""
    host = build_host(Identity(Ed25519PrivateKey.generate()), HostConfig(listen=(), psk=psk))
    try:
        with trio.fail_after(timeout_s):
            async with host.run(listen_addrs=[]):
                try:
                    await host.connect(
                        PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(addr)])
                    )
                    return ""
                finally:
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        await host.close()
    except trio.TooSlowError:
        return "timeout"
    except Exception as exc:  # refused, reset, wrong key: an ExceptionGroup or SwarmException
        return f"failed: {type(exc).__name__}"


class ReachServer:
    """Answers `/otd/reach/1.0.0`: dials the requester back from a fresh host."""

    def __init__(
        self,
        config: ReachConfig,
        *,
        psk: str | None = None,
        dialer: Callable[[str, str, float, str | None], Awaitable[str]] = fresh_dial,
    ) -> None:
        self.config = config
        self.psk = psk
        self.stats = ReachServerStats()
        self._dialer = dialer
        self._last: dict[str, float] = {}  # peer -> monotonic time of its last accepted request
        self._slots = trio.Semaphore(config.max_concurrent)

    def install(self, host: IHost) -> None:
        host.set_stream_handler(REACH_PROTOCOL, self.handle)

    def _rate_ok(self, peer: str) -> bool:
        now = time.monotonic()
        if len(self._last) > 4096:  # forget old entries (bounded memory)
            cutoff = now - self.config.per_peer_interval_s
            self._last = {p: t for p, t in self._last.items() if t > cutoff}
        last = self._last.get(peer)
        if last is not None and now - last < self.config.per_peer_interval_s:
            return False
        self._last[peer] = now
        return True

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(self.config.request_timeout_s):
                await self._serve(stream, peer)
        except Exception as exc:  # a bad or slow requester costs one stream, never the node
            self.stats.bad_requests += 1
            log.debug("reach request from %s failed: %r", peer[:16], exc)
            with trio.move_on_after(1):
                await stream.reset()
            return
        with trio.move_on_after(2):
            await stream.close()

    async def _serve(self, stream: INetStream, peer: str) -> None:
        req = await FrameReader(stream).read_msg(MAX_FRAME)
        addrs = req.get("addrs")
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            self.stats.bad_requests += 1
            await stream.write(pack_msg({"error": "bad_request"}))
            return
        self.stats.requests += 1
        if not self._rate_ok(peer):
            self.stats.refused_rate += 1
            await stream.write(pack_msg({"error": "rate"}))
            return
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self.stats.refused_busy += 1
            await stream.write(pack_msg({"error": "busy"}))
            return
        try:
            remote = stream.get_remote_address()
            observed = remote[0] if remote else None
            results: dict[str, dict[str, Any]] = {}
            for a in addrs[: self.config.max_addrs]:
                target, why = dial_target(a, peer, observed)
                if target is None:
                    self.stats.ip_mismatch += why == "ip_mismatch"
                    results[a] = {"ok": False, "why": why}
                    continue
                why = await self._dialer(peer, target, self.config.dial_timeout_s, self.psk)
                if why:
                    self.stats.dialed_failed += 1
                else:
                    self.stats.dialed_ok += 1
                results[a] = {"ok": not why, "why": why}
        finally:
            self._slots.release()
        # The IP we saw the request come from: behind NAT it is not the one the node claims.
        await stream.write(pack_msg({"results": results, "observed": observed or ""}))


# -- the asking side ----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerAnswer:
    peer: str
    results: dict[str, bool] = field(default_factory=dict)  # addr -> dialled back
    reasons: dict[str, str] = field(default_factory=dict)  # addr -> why not
    error: str = ""  # the peer refused or failed: no results
    observed: str = ""  # the IP the peer saw our request come from


async def ask_peer(host: IHost, peer: str, addrs: Sequence[str], timeout_s: float) -> PeerAnswer:
    """One request to one connected peer; errors become ``PeerAnswer.error``."""
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(ID.from_base58(peer), [REACH_PROTOCOL])
            try:
                await stream.write(pack_msg({"addrs": list(addrs)}))
                resp = await FrameReader(stream).read_msg(MAX_FRAME)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except trio.TooSlowError:
        return PeerAnswer(peer, error="timeout")
    except Exception as exc:
        return PeerAnswer(peer, error=f"{type(exc).__name__}")
    if "error" in resp:
        return PeerAnswer(peer, error=str(resp["error"])[:64])
    raw = resp.get("results")
    if not isinstance(raw, dict):
        return PeerAnswer(peer, error="malformed")
    results, reasons = {}, {}
    for a in addrs:
        r = raw.get(a)
        if isinstance(r, dict) and isinstance(r.get("ok"), bool):
            results[a] = r["ok"]
            if not r["ok"]:
                reasons[a] = str(r.get("why", ""))[:64]
    observed = resp.get("observed")
    return PeerAnswer(
        peer, results, reasons, observed=observed if isinstance(observed, str) else ""
    )


@dataclass(frozen=True)
class Verdict:
    status: str  # public | private | unknown
    checked_at: float  # unix time
    addrs: dict[str, dict[str, Any]]  # addr -> {"reachable": bool|None, "yes": n, "no": n}
    answers: list[PeerAnswer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked_at": self.checked_at,
            "addrs": self.addrs,
            "peers": [
                {
                    "peer": a.peer,
                    "error": a.error,
                    "results": a.results,
                    "reasons": a.reasons,
                    "observed": a.observed[:64],
                }
                for a in self.answers
            ],
        }

    def summary(self) -> str:
        """One log line's reason: how many peers could (not) dial which address."""
        answered = sum(1 for a in self.answers if not a.error)
        if self.status == PUBLIC:
            ok = [a for a, v in self.addrs.items() if v["reachable"]]
            best = max(self.addrs[a]["yes"] for a in ok)
            return f"{best}/{answered} peers dialled {', '.join(ok)}"
        if self.status == PRIVATE:
            worst = min(v["no"] for v in self.addrs.values())
            seen = sorted({a.observed for a in self.answers if a.observed} - set(_ips(self.addrs)))
            nat = f"; they see us at {', '.join(seen)}: behind NAT?" if seen else ""
            return f"{worst}/{answered} peers could not dial {', '.join(self.addrs)}{nat}"
        errors = sorted({a.error for a in self.answers if a.error})
        return f"{answered} of {len(self.answers)} asked peers answered" + (
            f" (errors: {', '.join(errors)})" if errors else ""
        )


def _ips(addrs: Sequence[str]) -> list[str]:
    return [a.split("/")[2] for a in addrs if a.startswith("/ip4/") and a.count("/") >= 2]


def combine(
    addrs: Sequence[str], answers: Sequence[PeerAnswer], quorum: int, now: float
) -> Verdict:
    """Per address: reachable if >= quorum peers dialled it, unreachable if >= quorum could
    not, else undecided. The node: public if some address is reachable; private if every
    address is unreachable; else unknown."""
    per: dict[str, dict[str, Any]] = {}
    for a in addrs:
        yes = sum(1 for ans in answers if ans.results.get(a) is True)
        no = sum(1 for ans in answers if ans.results.get(a) is False)
        reachable = True if yes >= quorum else False if no >= quorum else None
        per[a] = {"reachable": reachable, "yes": yes, "no": no}
    if any(v["reachable"] is True for v in per.values()):
        status = PUBLIC
    elif per and all(v["reachable"] is False for v in per.values()):
        status = PRIVATE
    else:
        status = UNKNOWN
    return Verdict(status, now, per, list(answers))


class ReachabilityChecker:
    """Asks a few connected peers to dial us back, now and then; keeps the last verdict and
    tells listeners (the relay client) when the status changes."""

    def __init__(
        self,
        config: ReachConfig,
        *,
        own_addrs: Callable[[], list[str]],
        on_change: Callable[[Verdict], None] | None = None,
    ) -> None:
        self.config = config
        self.own_addrs = own_addrs  # our direct (non-relayed) addresses
        self.on_change = on_change
        self.verdict: Verdict | None = None
        self.checks = 0
        self._wake = trio.Event()

    @property
    def status(self) -> str:
        return self.verdict.status if self.verdict is not None else UNKNOWN

    def snapshot(self) -> dict[str, Any]:
        base: dict[str, Any] = {"status": self.status, "checks": self.checks}
        if self.verdict is not None:
            base.update(self.verdict.to_dict())
        return base

    def recheck(self) -> None:
        """Check again soon (a new peer connected, an address changed)."""
        self._wake.set()

    async def check(self, host: IHost, candidates: Sequence[str] | None = None) -> Verdict:
        """Ask up to ``max_peers`` connected peers (``candidates`` first) about our direct
        addresses at once; combine their answers and keep the verdict."""
        addrs = [a for a in self.own_addrs() if "/p2p-circuit" not in a]
        verdict = await self.probe(host, addrs, candidates)
        self._record(verdict)
        return verdict

    async def probe(
        self, host: IHost, addrs: Sequence[str], candidates: Sequence[str] | None = None
    ) -> Verdict:
        """The verdict on ``addrs`` (not kept: a what-if, e.g. a port forward being set up)."""
        addrs = list(addrs)[: self.config.max_addrs]
        me = host.get_id()
        peers = [p for p in (candidates or []) if p != me.to_base58()]
        if not peers:
            peers = [p.to_base58() for p in host.get_connected_peers() if p != me]
        peers = peers[: self.config.max_peers]
        answers: list[PeerAnswer] = []

        async def one(p: str) -> None:
            answers.append(await ask_peer(host, p, addrs, self.config.request_timeout_s))

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(one, p)
        return combine(addrs, answers, self.config.quorum, time.time())

    def _record(self, verdict: Verdict) -> None:
        old = self.status
        self.verdict = verdict
        self.checks += 1
        line = "reachability: %s (%s)"
        if verdict.status == PRIVATE:
            log.warning(line, verdict.status, verdict.summary())
        else:
            log.info(line, verdict.status, verdict.summary())
        if self.on_change is not None and verdict.status != old:
            self.on_change(verdict)

    async def run(
        self,
        host: IHost,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Check as soon as ``quorum`` peers are connected, then every ``interval_s`` (every
        ``retry_s`` while unknown, or sooner on `recheck`). One check at a time."""
        cfg = self.config
        task_status.started()
        while True:
            if len(host.get_connected_peers()) < cfg.quorum:
                # Too few peers to decide: look again in a second (cheap), or on `recheck`.
                with trio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            try:
                await self.check(host)
            except Exception as exc:  # a check must never take the node down
                log.info("reachability check failed: %r", exc)
            with trio.move_on_after(cfg.retry_s if self.status == UNKNOWN else cfg.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()
