"""Forward a Unix socket to a TCP port inside a network namespace.

A node in a namespace serves HTTP on that namespace's 127.0.0.1, which the host cannot
reach (no link leads from a testbed to the host, by design). Unix sockets live in the file
system, not in a network namespace, so this process, started inside the namespace, lets the
test driver talk to the node (and the node sees a loopback client, as admin calls require):

    ip netns exec <ns> python -m p2pcache.testbed.forward <socket path> 127.0.0.1 8080
"""

from __future__ import annotations

import os
import socket
import sys
from functools import partial

import trio

CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64  # a test driver's handful of clients; more wait for a slot


async def _pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        try:
            await dst.send_eof()  # type: ignore[attr-defined]
        except (AttributeError, trio.BrokenResourceError, trio.ClosedResourceError):
            await dst.aclose()


async def _handle(
    host: str, port: int, limiter: trio.CapacityLimiter, client: trio.SocketStream
) -> None:
    async with limiter, client:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                upstream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError):
            return
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, upstream)
            nursery.start_soon(_pipe, upstream, client)


async def serve(path: str, host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(MAX_CONNECTIONS)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    await trio.serve_listeners(partial(_handle, host, port, limiter), [trio.SocketListener(sock)])


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: python -m p2pcache.testbed.forward SOCKET_PATH HOST PORT", file=sys.stderr)
        return 2
    if os.path.exists(argv[0]):  # a stale socket of an earlier run
        os.unlink(argv[0])
    try:
        trio.run(serve, argv[0], argv[1], int(argv[2]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
