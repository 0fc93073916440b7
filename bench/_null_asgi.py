"""A trivial ASGI app on hypercorn's trio worker: the HTTP server's own per-request floor
(used by bench_http.py as a reference row). Prints the bound URL on stdout."""

import json
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

BODY = json.dumps({"x_cache": {"level": "L0"}, "text": "x" * 600}).encode()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":  # answer it: returning at once races hypercorn's start-up
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"x-cache-level", b"L0"),
                (b"content-length", str(len(BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def main() -> None:
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, cfg)
        print(json.dumps({"event": "ready", "http": binds[0]}), flush=True)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
