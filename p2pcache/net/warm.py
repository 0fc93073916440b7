"""Warm connections: dial advertising producers before a request needs them.

The first L2 fetch from a producer we never connected to pays the dial inside the request
(~0.26 s on loopback: TCP, the Noise handshake, yamux, identify), while the rest of an L2
answer is a few ms of fetch plus verification (tens of ms on a GPU). Adverts name producers
long before a request asks for their entries, so as adverts arrive we dial a bounded number
of them, best reputation first.

Bounded on purpose: an advert's addresses are its producer's claim (the Noise handshake
rejects an address that is not that peer's, but only after a TCP connect), so a flood of
adverts must not turn the node into a dialler of arbitrary hosts. At most ``max_peers``
producer connections are kept warm, ``concurrency`` dials run at a time, and each producer
gets one attempt per ``retry_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmConfig:
    max_peers: int = 8  # producers kept connected ahead of need; 0 turns pre-dialling off
    concurrency: int = 4  # dials at a time
    retry_s: float = 300.0  # one attempt per producer per this long
    dial_timeout_s: float = 10.0


class WarmConnections:
    """Decides whom to dial (`candidates`) and runs the dials (`run`).

    ``connected()`` gives the peer ids connected now, ``dial(peer_id, addrs, timeout_s)``
    connects or raises, ``score(peer_id)`` orders candidates, ``is_banned`` excludes them."""

    def __init__(
        self,
        config: WarmConfig,
        self_id: str,
        *,
        connected: Callable[[], set[str]],
        dial: Callable[[str, Sequence[str], float], Awaitable[None]],
        score: Callable[[str], float],
        is_banned: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.self_id = self_id
        self._connected = connected
        self._dial = dial
        self._score = score
        self._is_banned = is_banned
        self._tried: dict[str, float] = {}  # peer id -> monotonic time of the last attempt
        self._inflight: dict[str, trio.Event] = {}
        self.stats = {"dialled": 0, "failed": 0}

    def candidates(
        self, producers: Mapping[str, Sequence[str]], now: float | None = None
    ) -> list[str]:
        """Producers to dial now: not us, not connected, not banned, not tried within
        ``retry_s``, with addresses; best score first, as many as the budget allows."""
        cfg = self.config
        if cfg.max_peers <= 0:
            return []
        now = time.monotonic() if now is None else now
        for p in [p for p, t in self._tried.items() if now - t >= cfg.retry_s]:
            del self._tried[p]  # may be tried again; keeps the map as small as the retry window
        connected = self._connected()
        warm = sum(1 for p in producers if p in connected) + len(self._inflight)
        budget = cfg.max_peers - warm
        if budget <= 0:
            return []
        fresh = [
            p
            for p, addrs in producers.items()
            if addrs
            and p != self.self_id
            and p not in connected
            and p not in self._inflight
            and p not in self._tried
            and not self._is_banned(p)
        ]
        fresh.sort(key=self._score, reverse=True)
        return fresh[:budget]

    async def wait_inflight(self, peer_id: str, timeout_s: float) -> None:
        """If a warm-up dial to ``peer_id`` is under way, wait for it (at most ``timeout_s``)
        instead of opening a second connection beside it."""
        ev = self._inflight.get(peer_id)
        if ev is not None:
            with trio.move_on_after(timeout_s):
                await ev.wait()

    async def run(
        self,
        changed: Callable[[], trio.Event],
        producers: Callable[[], Mapping[str, Sequence[str]]],
    ) -> None:
        """Forever: on every index change (``changed()`` gives the event the next change
        sets), dial the current candidates. Taking the event before looking means a change
        during a pass is never missed."""
        if self.config.max_peers <= 0:
            return
        limiter = trio.CapacityLimiter(self.config.concurrency)
        async with trio.open_nursery() as nursery:
            while True:
                ev = changed()
                known = producers()
                for pid in self.candidates(known):
                    self._tried[pid] = time.monotonic()
                    self._inflight[pid] = trio.Event()
                    nursery.start_soon(self._dial_one, pid, tuple(known[pid]), limiter)
                await ev.wait()

    async def _dial_one(
        self, peer_id: str, addrs: tuple[str, ...], limiter: trio.CapacityLimiter
    ) -> None:
        try:
            async with limiter:
                await self._dial(peer_id, addrs, self.config.dial_timeout_s)
            self.stats["dialled"] += 1
            log.info("warm: connected to producer %s", peer_id[:16])
        # The fetch path will try again (and count it). Dial errors may come as an ExceptionGroup,
        # which is an Exception; a group that holds a Cancelled is a BaseExceptionGroup and
        # propagates.
        except Exception as exc:
            self.stats["failed"] += 1
            log.info("warm: could not reach producer %s: %r", peer_id[:16], exc)
        finally:
            self._inflight.pop(peer_id).set()
