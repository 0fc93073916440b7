"""A userspace link shaper, for kernels without the netem qdisc (container and microVM
kernels often ship without sch_netem).

The testbed splices a shaped link: the node's veth end ``p<i>`` and a second veth ``q<i>``
(whose peer is the bridge port) both sit in the switch namespace, and this process
forwards Ethernet frames between them through AF_PACKET sockets, holding each frame for the
link's delay (plus jitter), its serialization time at the link rate, and dropping the lost
fraction. Each direction stays FIFO (jitter never reorders: TCP would see false losses).

Frames must be whole and carry finished checksums, so the testbed turns off checksum and
segmentation offloads on every node interface (``offload_off``) when it shapes this way.

    python -m p2pcache.testbed.shaper p1:q1:50:0:0:0 [p2:q2:...]   (delay ms, jitter ms,
                                                                     rate mbit (0: none), loss %)
"""

from __future__ import annotations

import array
import fcntl
import heapq
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from types import FrameType

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
SIOCETHTOOL = 0x8946
# Legacy ethtool "set" commands: tx checksum, scatter-gather, TSO, GSO, GRO.
_ETHTOOL_SET = (0x17, 0x19, 0x1F, 0x24, 0x2C)
MAX_QUEUED = 4096  # frames held at once (netem's default limit is 1000 per qdisc)
MAX_FRAME = 65536


@dataclass(frozen=True)
class Leg:
    """Two interfaces whose frames are forwarded to each other, shaped both ways."""

    a: str
    b: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0
    loss_pct: float = 0.0

    def spec(self) -> str:
        return (
            f"{self.a}:{self.b}:{self.delay_ms}:{self.jitter_ms}:{self.rate_mbit}:{self.loss_pct}"
        )

    @staticmethod
    def parse(text: str) -> Leg:
        a, b, d, j, r, loss = text.split(":")
        return Leg(a, b, float(d), float(j), float(r), float(loss))


def offload_off(ifname: str) -> None:
    """Turn off checksum/segmentation offloads on ``ifname`` (in this process's namespace):
    frames then leave whole and checksummed, as a userspace forwarder needs them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in _ETHTOOL_SET:
            buf = array.array("I", [cmd, 0])
            ifr = struct.pack("16sP", ifname.encode(), buf.buffer_info()[0])
            try:
                fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
            except OSError:  # a feature the driver cannot change: it is off already
                continue


def _packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
    s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    s.setblocking(False)
    return s


class _Direction:
    """One direction of a leg: where its frames go and when the link is next free."""

    def __init__(self, out: socket.socket, leg: Leg) -> None:
        self.out = out
        self.leg = leg
        self.last_due = 0.0
        self.tx_free = 0.0

    def due(self, now: float, size: int) -> float | None:
        leg = self.leg
        if leg.loss_pct and random.random() * 100 < leg.loss_pct:
            return None
        t = now
        if leg.rate_mbit:
            self.tx_free = max(now, self.tx_free) + size * 8 / (leg.rate_mbit * 1e6)
            t = self.tx_free
        t += (leg.delay_ms + random.uniform(-leg.jitter_ms, leg.jitter_ms)) / 1000
        self.last_due = max(t, self.last_due)  # FIFO
        return self.last_due


def run(legs: list[Leg]) -> None:
    """Forward until SIGTERM/SIGINT."""
    stopping = False

    def stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    route: dict[int, tuple[socket.socket, _Direction]] = {}
    for leg in legs:
        sa, sb = _packet_socket(leg.a), _packet_socket(leg.b)
        route[sa.fileno()] = (sa, _Direction(sb, leg))
        route[sb.fileno()] = (sb, _Direction(sa, leg))
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    print("ready", flush=True)
    while not stopping:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
            except OSError:  # a full or vanished interface: the frame is lost, as on a wire
                pass
        timeout = min(0.5, max(0.0, queue[0][0] - now)) if queue else 0.5
        try:
            readable, _, _ = select.select(list(route), [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in readable:
            sock, direction = route[fd]
            for _ in range(64):  # drain a burst, bounded
                try:
                    frame, addr = sock.recvfrom(MAX_FRAME)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:  # our own sends, seen again
                    continue
                due = direction.due(now, len(frame))
                if due is None or len(queue) >= MAX_QUEUED:
                    continue
                seq += 1
                heapq.heappush(queue, (due, seq, direction.out, frame))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--offload-off"]:
        for name in argv[1:]:
            offload_off(name)
        return 0
    try:
        legs = [Leg.parse(a) for a in argv]
    except ValueError:
        print(__doc__, file=sys.stderr)
        return 2
    if not legs:
        print(__doc__, file=sys.stderr)
        return 2
    run(legs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
