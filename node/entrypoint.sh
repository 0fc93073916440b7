#!/bin/sh
# Container entry point: run the node with /etc/p2pcache/node.toml, env (P2PCACHE_*) and args.
# exec, so the node is PID 1's only child and gets SIGTERM from `docker stop` directly.
set -e
CONFIG="${P2PCACHE_CONFIG:-/etc/p2pcache/node.toml}"
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    exec p2pcache node run --config "$CONFIG" "$@"
fi
exec "$@"
