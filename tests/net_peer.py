"""A p2pcache network peer in its own process, driven over stdin/stdout (JSON lines).

Used by tests/test_net_*.py: real py-libp2p host, real LMDB store, and (with --model) the real
model for L3 and verification. Prints ``{"event": "ready", ...}`` once listening; then each
stdin line ``{"cmd": ..., ...}`` gets exactly one JSON reply line. EOF on stdin or
``{"cmd": "quit"}`` shuts it down cleanly.

Test-only behaviours: ``--evil [last|near-tie|topk|wrong-key|bad-text]`` serves altered
completions re-signed as its own (a liar, `EvilSource`);
``--stall`` sends the response header and half the body, prints ``{"event": "stalled"}`` and
hangs (the test kills it mid-transfer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import msgpack
import trio

from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.net.ads import ads_topic
from p2pcache.net.config import (
    ConnLimits,
    DirectoryConfig,
    NetConfig,
    PeersConfig,
    ReachConfig,
    RelayConfig,
    TierConfig,
    WarmConfig,
)
from p2pcache.net.evidence import evidence_topic
from p2pcache.net.fetch import (
    FetchRequest,
    FetchServer,
    ResponseHeader,
    StoreSource,
    entry_from_wire,
    entry_to_wire,
    fetch,
)
from p2pcache.net.service import NetService
from p2pcache.net.wire import LEN, pack_msg
from p2pcache.node.build import NodeOptions, build_network, build_resolver, open_local
from p2pcache.resolver import Resolver
from p2pcache.store import Entry, Output, Store


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class EvilSource(StoreSource):
    """Serves its stored entries altered and re-signed by this (lying) node. ``mode``:

    - ``last``: the last token changed to another (text: the altered tokens' own
      detokenization with the model loaded, so only the model-run check can catch it);
    - ``near-tie``: the honest greedy answer with one token swapped for the local runner-up
      where the two nearly tie (the closest such place after the first token);
    - ``topk``: a sampled answer steered every 4th token to the 5th best local choice;
    - ``wrong-key``: the entry re-made for another key, served for the asked one;
    - ``bad-text``: the right tokens under a text that is not theirs.

    ``near-tie`` and ``topk`` need the prompt: `prepare` makes the altered entry once the
    node has computed the honest one, and says where it lied and by what margin."""

    def __init__(
        self,
        store: Store,
        model_hash: str,
        identity: Identity,
        backend: Any = None,
        mode: str = "last",
    ) -> None:
        super().__init__(store, model_hash)
        self.identity = identity
        self.backend = backend
        self.mode = mode
        self.altered: dict[str, Entry] = {}

    def _resign(self, e: Entry, toks: list[int], text: str) -> Entry:
        e.output = Output(toks, text, e.output.finish_reason)
        e.producer = self.identity.peer_id
        e.signature = self.identity.sign(e.signing_payload())
        return e

    def prepare(self, key: str, prompt: list[int]) -> dict[str, Any]:
        """Blocking (runs the model): the altered answer for ``key``, kept for serving."""
        raw = super().value(FetchRequest(key, self.model_hash, "decoder_final"))
        assert raw is not None and self.backend is not None
        e = entry_from_wire(raw)
        toks = list(e.output.tokens)
        b = self.backend
        # The verifier's own rows: the prompt in generation's batches, then 128-row blocks.
        s = b.score(prompt, toks, top_k=5, chunk=128, merged=False)
        if self.mode == "near-tie":
            # The closest near-tie among the first tokens the verifier's rows agree on.
            agree = next((j for j, ids in enumerate(s.top_ids) if ids[0] != toks[j]), len(toks))
            margin, at, alt = min(
                (lps[0] - lps[1], j, ids[1])
                for j, (ids, lps) in enumerate(zip(s.top_ids, s.top_logprobs, strict=True))
                if 1 <= j < min(agree, 8) and not b.is_eog(ids[1])
            )
            toks[at] = alt
            info = {"position": at, "margin": margin}
        else:
            steered = [j for j in range(3, len(toks), 4) if s.top_ids[j][4] != toks[j]]
            for j in steered:
                toks[j] = s.top_ids[j][4]
            info = {"position": steered[0], "margin": None}
        info["altered_text"] = b.detokenize(toks)
        self.altered[key] = self._resign(e, toks, b.detokenize(toks))
        return info

    def value(self, req: FetchRequest) -> bytes | None:
        if req.key in self.altered:
            return entry_to_wire(self.altered[req.key])
        raw = super().value(req)
        if raw is None or self.mode not in ("last", "wrong-key", "bad-text"):
            return raw
        e = entry_from_wire(raw)
        if self.mode == "wrong-key":  # an entry made for another key, served for this one
            e.input_sha256 = hashlib.sha256(e.input_sha256.encode()).hexdigest()
            return entry_to_wire(self._resign(e, list(e.output.tokens), e.output.text))
        if self.mode == "bad-text":  # the right tokens under another text
            toks = list(e.output.tokens)
            return entry_to_wire(self._resign(e, toks, e.output.text + " [altered]"))
        toks = list(e.output.tokens) or [100]
        toks[-1] = (toks[-1] + 7) % 1000 + 300
        text = (
            self.backend.detokenize(toks)
            if self.backend is not None
            else e.output.text + " [altered]"
        )
        return entry_to_wire(self._resign(e, toks, text))


class StallServer(FetchServer):
    async def _serve(self, stream: Any, peer: str) -> None:  # header + half the body, then hang
        from p2pcache.net.wire import FrameReader

        req = FetchRequest.from_msg(await FrameReader(stream).read_msg())
        body = self.source.value(req)
        if body is None:
            return
        import hashlib

        h = ResponseHeader(
            req.key,
            req.model_hash,
            req.level,
            req.range,
            len(body),
            hashlib.sha256(body).hexdigest(),
            peer,
            self.identity.peer_id,
            int(time.time() * 1000),
        )
        h = ResponseHeader(**{**h.__dict__, "sig": self.identity.sign(h.payload())})
        await stream.write(pack_msg(h.to_msg()))
        half = body[: len(body) // 2]
        await stream.write(LEN.pack(len(half)) + half)  # one body frame, then nothing: no end frame
        out({"event": "stalled"})
        await trio.sleep_forever()


async def main(a: argparse.Namespace) -> None:
    data_dir = Path(a.data_dir or tempfile.mkdtemp(prefix="otd-peer-"))
    local = None
    if a.model:
        local = open_local(
            NodeOptions(data_dir=data_dir, n_ctx=2048, kv_prefix=False, durable=False)
        )
        identity, store, model_hash, worker = (
            local.identity,
            local.store,
            local.model_hash,
            local.worker,
        )
    else:
        identity = Identity.load_or_create(data_dir / "identity.key")
        store = Store(data_dir / "store", size_cap=1 << 30, durable=False)
        model_hash, worker = a.model_hash, None
    cfg = NetConfig(
        listen=(f"/ip4/{a.ip}/tcp/{a.port}",),
        reach=ReachConfig(
            enabled=a.reach, retry_s=a.reach_retry_s, per_peer_interval_s=a.reach_per_peer_s
        ),
        relay=RelayConfig(service=a.relay_service, dcutr=not a.no_dcutr),
        psk=a.psk,
        peers=PeersConfig(
            bootstrap=tuple(a.bootstrap),
            conn=ConnLimits(**json.loads(a.conn_limits)),
            warm=WarmConfig(max_peers=a.warm_peers),
        ),
        directory=DirectoryConfig(readvertise_s=a.readvertise_s, ad_batch_s=0.1),
        tier=TierConfig(fetch_timeout_s=a.fetch_timeout_s),
    )
    evil = (
        EvilSource(
            store, model_hash, identity, local.backend if local is not None else None, a.evil
        )
        if a.evil
        else None
    )
    sources = [evil] if evil is not None else None
    net = build_network(
        identity,
        store,
        model_hash,
        cfg,
        worker=worker,
        sources=sources,
        server_class=StallServer if a.stall else None,
    )
    svc = net.service
    resolver = build_resolver(local, net) if local is not None else None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            out(
                {
                    "event": "ready",
                    "peer_id": identity.peer_id,
                    "addrs": svc.addrs(),
                    "model_hash": model_hash,
                }
            )
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line or not line.strip():
                    if not line:
                        break
                    continue
                try:
                    cmd = json.loads(line)
                    if cmd["cmd"] == "quit":
                        break
                    out(
                        {
                            "ok": True,
                            **(await handle(cmd, svc, store, resolver, model_hash, identity, evil)),
                        }
                    )
                except Exception as exc:
                    out({"ok": False, "error": repr(exc), "trace": traceback.format_exc()[-1500:]})
            nursery.cancel_scope.cancel()
    finally:
        if local is not None:
            local.close()
        else:
            store.close()
    out({"event": "stopped"})


async def handle(
    cmd: dict[str, Any],
    svc: NetService,
    store: Store,
    resolver: Resolver | None,
    model_hash: str,
    identity: Identity,
    evil: EvilSource | None = None,
) -> dict[str, Any]:
    c = cmd["cmd"]
    if c == "put_entry":  # a synthetic entry (no model): for fetch/ads tests
        e = Entry(
            input_sha256=cmd["key"],
            model_hash=cmd.get("model_hash", model_hash),
            cache_level="decoder_final",
            output=Output(cmd.get("tokens", [1, 2, 3]), cmd.get("text", "abc")),
            params={},
            privacy_flag=cmd.get("private", False),
            producer=identity.peer_id,
        )
        e.signature = identity.sign(e.signing_payload())
        store.put(e)
        svc.directory.advertise(e)
        return {"key": e.input_sha256, "output_sha256": e.output.sha256()}
    if c == "resolve":
        from p2pcache.resolver import Request

        assert resolver is not None, "resolve needs --model"
        params = SamplingParams(**cmd.get("params", {"max_tokens": cmd.get("max_tokens", 16)}))
        request = Request(prompt=cmd["prompt"], params=params, share=cmd.get("share", False))
        ans = await resolver.resolve(request)
        reply: dict[str, Any] = {"answer": ans.to_dict()}
        if evil is not None and evil.mode != "last":
            prompt = (await resolver.keyed(request)).tokens
            reply["evil"] = await resolver.worker.run(
                lambda: evil.prepare(ans.input_sha256, prompt)
            )
        return reply
    if c == "fetch":
        req = FetchRequest(
            cmd["key"],
            cmd.get("model_hash", model_hash),
            cmd.get("level", "decoder_final"),
            max_bytes=cmd.get("max_bytes", 1 << 20),
        )
        try:
            await svc.connections.ensure_connected(cmd["peer"], cmd.get("addrs", []), 10)
            got = await fetch(
                svc.connections.host, cmd["peer"], req, timeout_s=cmd.get("timeout_s", 10)
            )
        except Exception as exc:
            return {"fetched": False, "error": type(exc).__name__, "detail": str(exc)}
        return {
            "fetched": True,
            "size": len(got.body),
            "server": got.header.server,
            "entry": msgpack.unpackb(bytes(got.body), raw=False)["output"],
        }
    if c == "raw_fetch":  # a hostile client: arbitrary bytes on /otd/fetch/1.0.0, returns the reply
        from libp2p.peer.id import ID

        from p2pcache.net.fetch import FETCH_PROTOCOL
        from p2pcache.net.wire import FrameReader, WireError

        await svc.connections.ensure_connected(cmd["peer"], cmd.get("addrs", []), 10)
        with trio.fail_after(cmd.get("timeout_s", 10)):
            stream = await svc.connections.host.new_stream(
                ID.from_base58(cmd["peer"]), [FETCH_PROTOCOL]
            )
            await stream.write(bytes.fromhex(cmd["data_hex"]))
            try:
                reply = await FrameReader(stream).read_msg()
            except WireError as exc:  # the server reset or closed the stream
                return {"reply": None, "detail": str(exc)}
            finally:
                try:
                    await stream.reset()
                except Exception:
                    pass
        return {"reply": {k: v for k, v in reply.items() if k != "sig"}}
    if c == "index":
        index = svc.directory.index
        return {
            "providers": [
                p.peer_id for p in index.providers(cmd["key"], cmd.get("level", "decoder_final"))
            ],
            "snapshot": index.snapshot(),
        }
    if c == "stats":
        stats = svc.stats()
        return {
            "ads": stats["ads"],
            "evidence": stats["evidence"],
            "server": stats["server"],
            "tier": stats["tier"],
            "conn": stats.get("conn", {}),
            "peers": [p["peer_id"] for p in svc.peers()],
        }
    if c == "rep":
        return {"reputation": svc.reputation()}
    if c == "publish_raw":  # a hostile publisher: arbitrary bytes on a topic
        topic = {
            "ads": ads_topic(cmd.get("model_hash", model_hash)),
            "evidence": evidence_topic(cmd.get("model_hash", model_hash)),
        }.get(cmd["topic"], cmd["topic"])
        # A hostile node skips its own validator (py-libp2p validates what it publishes too).
        assert svc.gossip is not None
        pubsub = svc.gossip.pubsub
        saved = pubsub.topic_validators.pop(topic, None)
        try:
            await pubsub.publish(topic, bytes.fromhex(cmd["data_hex"]))
        finally:
            if saved is not None:
                pubsub.topic_validators[topic] = saved
        return {}
    if c == "wait_provider":  # bounded wait (on the index-changed event) for a provider of a key
        timeout_s = cmd.get("timeout_s", 20)
        providers = await svc.wait_providers(cmd["key"], wait_s=timeout_s)
        if not providers:
            raise trio.TooSlowError(f"no provider of {cmd['key'][:12]} within {timeout_s} s")
        return {"providers": providers}
    if c == "wait_peers":
        with trio.fail_after(cmd.get("timeout_s", 20)):
            while len(svc.connections.host.get_connected_peers()) < cmd["n"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return {}
    if c == "wait_mesh":  # until n peers subscribed to our ad topic are in our GossipSub mesh
        topic = ads_topic(model_hash)

        def meshed() -> int:
            g = svc.gossip
            return 0 if g is None else min(len(g.subscribers(topic)), len(g.mesh_ids(topic)))

        with trio.fail_after(cmd.get("timeout_s", 20)):
            while meshed() < cmd["n"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return {}
    if c == "wait_rejected":  # until at least n adverts have been rejected in total
        with trio.fail_after(cmd.get("timeout_s", 20)):
            while sum(svc.directory.validator.stats.rejected.values()) < cmd["n"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return {"rejected": svc.directory.validator.stats.rejected}
    if c == "wait_evidence":
        with trio.fail_after(cmd.get("timeout_s", 60)):
            while svc.trust.stats["confirmed"] + svc.trust.stats["refuted"] < cmd.get("n", 1):  # noqa: ASYNC110
                await trio.sleep(0.05)
        return {"evidence": svc.trust.stats}
    if c in (
        "reach",
        "raw_reach",
        "reach_state",
        "paths",
        "dial",
        "reserve",
        "wait_reach",
        "wait_relayed",
    ):
        return await handle_reach(cmd, svc)
    if c in (
        "gossip_score",
        "heartbeat",
        "announce_many",
        "sign_pubsub",
        "forward_raw",
        "peers_rows",
    ):
        return await handle_gossip(cmd, svc, store, identity, model_hash)
    if c == "sign_ad":  # a correctly signed advert from this node, for replay tests
        from p2pcache.net.ads import AdEntry, make_advert

        ad = make_advert(
            identity,
            cmd.get("model_hash", model_hash),
            cmd.get("addrs", svc.addrs()),
            cmd["seq"],
            [AdEntry("decoder_final", k, 10, "00" * 32) for k in cmd.get("keys", [cmd.get("key")])],
            ts=cmd.get("ts"),
        )
        return {"data_hex": ad.encode().hex()}
    if c == "keyed":  # the cache key of a request, as this node computes it
        from p2pcache.resolver import Request

        assert resolver is not None, "keyed needs --model"
        params = SamplingParams(**cmd.get("params", {"max_tokens": cmd.get("max_tokens", 16)}))
        keyed = await resolver.keyed(Request(prompt=cmd["prompt"], params=params))
        return {"key": keyed.key, "prompt_tokens": len(keyed.tokens)}
    if c == "sybil_flood":  # n fresh identities, each signing a valid advert of the same keys
        from tests.hostile import sybil_flood

        assert svc.gossip is not None
        return {"sent": await sybil_flood(svc.gossip.pubsub, model_hash, cmd["keys"], cmd["n"])}
    raise ValueError(f"unknown command {c!r}")


async def handle_gossip(
    cmd: dict[str, Any], svc: NetService, store: Store, identity: Identity, model_hash: str
) -> dict[str, Any]:
    """GossipSub scoring commands (tests/test_gossip_swarm.py)."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    c, gossip = cmd["cmd"], svc.gossip
    assert gossip is not None
    topic = {"ads": ads_topic(model_hash), "evidence": evidence_topic(model_hash)}.get(
        cmd.get("topic", "ads"), cmd.get("topic", "")
    )
    if c == "gossip_score":  # the router's score of a peer, as py-libp2p computes it
        p = gossip.scorer.params
        thresholds = {
            "gossip": p.gossip_threshold,
            "publish": p.publish_threshold,
            "graylist": p.graylist_threshold,
        }
        return {**gossip.peer_score(cmd["peer"]), "thresholds": thresholds}
    if c == "heartbeat":
        return gossip.heartbeat()
    if c == "peers_rows":  # the admin view of connected peers (`NetService.peers`)
        return {"rows": svc.peers()}
    if c == "announce_many":  # n new shared entries, each announced at once (a burst of adverts)
        entries = []
        for i in range(cmd["n"]):
            key = hashlib.sha256(f"{cmd.get('salt', '')}:{i}".encode()).hexdigest()
            e = Entry(
                input_sha256=key,
                model_hash=model_hash,
                cache_level="decoder_final",
                output=Output([1, 2, 3], f"burst {i}"),
                params={},
                privacy_flag=False,
                producer=identity.peer_id,
            )
            e.signature = identity.sign(e.signing_payload())
            store.put(e)
            entries.append(e)
        before = svc.directory.stats["adverts"]
        async with trio.open_nursery() as nursery:
            for e in entries:
                nursery.start_soon(svc.directory.announce, e)
        # announce returns after at most a second; the paced publishes go on behind it
        with trio.fail_after(cmd.get("timeout_s", 60)):
            while svc.directory.stats["adverts"] - before < len(entries):  # noqa: ASYNC110
                await trio.sleep(0.05)
        return {
            "keys": [e.input_sha256 for e in entries],
            "adverts": svc.directory.stats["adverts"] - before,
        }
    if c == "sign_pubsub":  # a pubsub message from this node, signed as py-libp2p signs, unsent
        msg = rpc_pb2.Message(
            data=bytes.fromhex(cmd["data_hex"]),
            topicIDs=[topic],
            from_id=ID.from_base58(identity.peer_id).to_bytes(),
            seqno=gossip.pubsub._next_seqno(),
        )
        key = gossip.pubsub.sign_key
        assert key is not None
        msg.signature = key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        msg.key = svc.connections.host.get_public_key().serialize()
        return {"msg_hex": msg.SerializeToString().hex()}
    # forward_raw: a ready pubsub message (e.g. another node's, signed earlier) sent to one peer,
    # the way a relay forwards what it received
    peer = ID.from_base58(cmd["peer"])
    with trio.fail_after(cmd.get("timeout_s", 10)):
        while peer not in gossip.pubsub.peers:  # noqa: ASYNC110 - its pubsub stream is up
            await trio.sleep(0.05)
    gossip.router.send_rpc(
        peer, rpc_pb2.RPC(publish=[rpc_pb2.Message.FromString(bytes.fromhex(cmd["msg_hex"]))])
    )
    return {}


async def handle_reach(cmd: dict[str, Any], svc: NetService) -> dict[str, Any]:
    """Reachability and relay commands (tests/test_reachability.py, tests/test_netns_nat.py)."""
    from libp2p.peer.id import ID

    from p2pcache.net.relay import connection_paths

    c, host = cmd["cmd"], svc.connections.host
    if c == "reach":  # one check now; with ``addrs``: a probe of what we claim (maybe a lie)
        if "addrs" in cmd:
            verdict = await svc.reach.probe(host, cmd["addrs"], cmd.get("peers"))
        else:
            verdict = await svc.reach.check(host, cmd.get("peers"))
        return {"verdict": verdict.to_dict()}
    if c == "raw_reach":  # a hostile client: arbitrary bytes on /otd/reach/1.0.0
        from p2pcache.net.reachability import REACH_PROTOCOL
        from p2pcache.net.wire import FrameReader

        with trio.fail_after(cmd.get("timeout_s", 30)):
            stream = await host.new_stream(ID.from_base58(cmd["peer"]), [REACH_PROTOCOL])
            try:
                await stream.write(bytes.fromhex(cmd["data_hex"]))
                return {"reply": await FrameReader(stream).read_msg()}
            except Exception as exc:  # the server reset or closed the stream
                return {"reply": None, "detail": repr(exc)[:200]}
            finally:
                with trio.move_on_after(1):
                    await stream.reset()
    if c == "reach_state":
        return {**svc.reachability(), "addrs": svc.addrs()}
    if c == "paths":  # relayed / direct for each connection to a peer, and their addresses
        conns = host.get_network().get_connections(ID.from_base58(cmd["peer"]))
        remote = [[str(a) for a in conn.get_transport_addresses()] for conn in conns]
        return {"paths": connection_paths(host, cmd["peer"]), "remote": remote}
    if c == "reserve":  # a relay slot on the relay at ``addr``, whatever reachability says
        return {"reserved": await svc.relays.reserve_on(host, cmd["addr"]), "addrs": svc.addrs()}
    if c == "dial":
        await svc.connections.dial(cmd["peer"], cmd["addrs"], cmd.get("timeout_s", 10))
        return {"paths": connection_paths(host, cmd["peer"])}
    timeout_s = cmd.get("timeout_s", 60)
    with trio.fail_after(timeout_s):
        if c == "wait_reach":  # until the checker reached ``status``
            while svc.reach.status != cmd["status"]:  # noqa: ASYNC110
                await trio.sleep(0.1)
        else:  # wait_relayed: until we hold a relay slot
            while not svc.relays.relayed_addrs():  # noqa: ASYNC110
                await trio.sleep(0.1)
    return {**svc.reachability(), "addrs": svc.addrs()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ip", default="127.0.0.1", help="listen address (netns tests)")
    ap.add_argument("--reach", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--reach-retry-s", type=float, default=15.0)
    ap.add_argument("--reach-per-peer-s", type=float, default=10.0)
    ap.add_argument("--relay-service", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-dcutr", action="store_true")
    ap.add_argument("--bootstrap", action="append", default=[])
    ap.add_argument("--psk")
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--model-hash", default="ee" * 32)
    ap.add_argument(
        "--evil",
        nargs="?",
        const="last",
        choices=["last", "near-tie", "topk", "wrong-key", "bad-text"],
        help="serve altered answers (see EvilSource)",
    )
    ap.add_argument("--stall", action="store_true")
    ap.add_argument("--conn-limits", default="{}", help="ConnLimits fields, as JSON")
    ap.add_argument("--warm-peers", type=int, default=8, help="0: no pre-dialling of producers")
    ap.add_argument("--readvertise-s", type=float, default=1.0)
    ap.add_argument("--fetch-timeout-s", type=float, default=5.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, args)
