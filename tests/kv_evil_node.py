"""A real node daemon with one test-only twist: it serves corrupted KV chunks.

Same config, model, LMDB, libp2p and HTTP API as ``p2pcache node run``; only the fetch
server's kv_prefix answers have every f16 value's sign flipped (well-formed, correctly framed
and signed: only a spot-check on the requester's model can tell). Used by tests/test_net_kv.py.

    python tests/kv_evil_node.py --data-dir D [--bootstrap ADDR] [--n-ctx N]
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import trio

from p2pcache.metrics import NodeMetrics
from p2pcache.net.config import NetConfig
from p2pcache.net.fetch import FetchRequest, StoreSource
from p2pcache.net.kv_tier import KvSource
from p2pcache.node.build import LocalParts, Network, build_network
from p2pcache.node.config import load_config
from p2pcache.node.daemon import run_node


class CorruptKvSource(KvSource):
    def value(self, req: FetchRequest) -> bytes | None:
        body = super().value(req)
        if body is None:
            return None
        n = len(req.chunks)
        arr = np.frombuffer(body, np.uint8).copy()
        arr[n * 32 + 1 :: 2] ^= 0x80  # the payloads only: the hashes still match the request
        return arr.tobytes()


def evil_network(local: LocalParts, config: NetConfig, metrics: NodeMetrics) -> Network:
    """The node's own network, serving corrupted chunks in place of its shared ones."""
    assert local.kv is not None
    sources = [
        StoreSource(local.store, local.model_hash),
        CorruptKvSource(local.kv, local.model_hash),
    ]
    net = build_network(
        local.identity,
        local.store,
        local.model_hash,
        config,
        worker=local.worker,
        kv=local.kv,
        metrics=metrics,
        sources=sources,
    )
    assert net.kv is not None
    return net


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--bootstrap", action="append", default=[])
    ap.add_argument("--n-ctx", type=int, default=2048)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = load_config(
        None,
        {},
        {
            "data_dir": a.data_dir,
            "http": "127.0.0.1:0",
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "bootstrap": a.bootstrap,
            "n_ctx": a.n_ctx,
            "log_format": "text",
        },
    )
    return trio.run(run_node, cfg, evil_network)


if __name__ == "__main__":
    sys.exit(main())
