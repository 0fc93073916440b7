"""The network between real node daemons: `p2pcache node run` processes on loopback, driven
over their HTTP API, in a line A - B - C (C bootstraps only from B; it dials A once A's
adverts reach it, through warm connections).

Honest nodes are real daemons (model, LMDB, libp2p, L2 tier). The misbehaving peers (a liar
that serves altered completions, a peer that stalls mid-transfer, a hostile publisher) are
tests/net_peer.py processes: the same NetService and model code with a test-only twist.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from p2pcache.identity import Identity
from p2pcache.node.cluster import NodeProcess, start_node, stop_all
from tests.net_harness import MESH_TIMEOUT_S, Line, Peers, mesh_peers, running_line, until

pytestmark = pytest.mark.model

MAX_TOKENS = 8
AD_TIMEOUT_S = 40.0  # an advert reaches C through B (or at the latest with a re-advertisement)


def metric(line: Line, node: NodeProcess, name: str) -> float:
    """One unlabelled sample from the node's /metrics."""
    text = line.http.get(f"{node.url}/metrics").text
    values = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return values[0]


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    tmp = tmp_path_factory.mktemp("line")
    # L2 here moves decoder_final entries only; KV-prefix resumption is tested on its
    # own and its first-use setup would dominate these tests' runtime on 2 cores.
    env = {"P2PCACHE_KV_PREFIX": "false"}
    with running_line(tmp, ["--n-ctx", "2048", "--log-level", "info"], env) as (a, b, c):
        with httpx.Client(timeout=120) as http:
            yield Line(a, b, c, http, a.ready["model"], tmp, MAX_TOKENS)


def test_status_addrs_and_line_topology(line: Line) -> None:
    for node in (line.a, line.b, line.c):
        st = line.admin(node, "/admin/status")
        assert st["addrs"] and all(a.endswith(f"/p2p/{st['peer_id']}") for a in st["addrs"])
    peers_of = {
        n.name: {p["peer_id"] for p in line.admin(n, "/admin/peers")["peers"]}
        for n in (line.a, line.b, line.c)
    }
    assert peers_of["B"] == {line.a.peer_id, line.c.peer_id}
    assert line.a.peer_id not in peers_of["C"]  # C dialled only B


def test_answer_computed_on_a_served_on_c_from_l2_then_l0(line: Line) -> None:
    prompt = "The three primary colours are"
    on_a = line.complete(line.a, prompt)
    assert on_a["x_cache"]["level"] == "L3"
    key = on_a["x_cache"]["input_sha256"]
    private = line.complete(line.a, "My private diary entry for today:", share=False)
    assert private["x_cache"]["level"] == "L3"
    private_key = private["x_cache"]["input_sha256"]
    later = line.complete(
        line.a, "Name a large planet:"
    )  # shared, advertised after the private one
    assert later["x_cache"]["level"] == "L3"

    assert line.providers(line.c, key, wait_s=AD_TIMEOUT_S) == [line.a.peer_id]  # relayed by B
    assert line.providers(line.c, later["x_cache"]["input_sha256"], wait_s=AD_TIMEOUT_S) == [
        line.a.peer_id
    ]
    # C dials the producer it learnt of from the adverts before any request needs it.
    until(
        lambda: (
            line.a.peer_id in {p["peer_id"] for p in line.admin(line.c, "/admin/peers")["peers"]}
        ),
        AD_TIMEOUT_S,
        "C warming a connection to A",
    )
    assert line.admin(line.c, "/admin/peers")["stats"]["warm"]["dialled"] >= 1
    on_c = line.complete(line.c, prompt)
    x = on_c["x_cache"]
    assert x["level"] == "L2" and x["input_sha256"] == key
    assert x["peer"]["peer"] == line.a.peer_id and x["peer"]["producer"] == line.a.peer_id
    assert x["peer"]["verified"] is True and x["peer"]["verify_ms"] > 0
    # Every token of A's answer was C's own choice (nothing generated on C), or, where the
    # batched walk and A's one-token decoding round a near-tie differently, C kept A's prefix
    # and finished the answer itself.
    n_out = on_a["usage"]["completion_tokens"]
    t = x["timings"]
    if t["local_tokens"] == 0:
        assert t["accepted_tokens"] == n_out
        assert on_c["choices"][0]["text"] == on_a["choices"][0]["text"]
        assert on_c["choices"][0]["finish_reason"] == on_a["choices"][0]["finish_reason"]
        assert on_c["usage"] == on_a["usage"]
    else:
        assert 0 < t["accepted_tokens"] < n_out
    again = line.complete(line.c, prompt)
    assert (
        again["x_cache"]["level"] == "L0"
        and again["choices"][0]["text"] == on_c["choices"][0]["text"]
    )
    rec = line.rep_of(line.c, line.a.peer_id)
    assert (
        rec["successes"] > 0.9
        and rec["failures"] == 0
        and rec["bytes_in"] > 0
        and not rec["banned"]
    )
    # Prometheus sees the transfer on both ends.
    assert metric(line, line.c, "p2pcache_bytes_fetched_total") >= x["peer"]["bytes"] > 0
    assert metric(line, line.a, "p2pcache_bytes_served_total") >= x["peer"]["bytes"]

    # A sampled (seeded) answer: C's sampler, with the request's seed, picks every token too.
    sampled = {"temperature": 0.8, "seed": 7}
    s_a = line.complete(line.a, "Invent a name for a cat:", **sampled)
    assert line.providers(line.c, s_a["x_cache"]["input_sha256"], wait_s=AD_TIMEOUT_S) == [
        line.a.peer_id
    ]
    s_c = line.complete(line.c, "Invent a name for a cat:", **sampled)
    assert s_c["x_cache"]["peer"]["verified"] is True
    if s_c["x_cache"]["timings"]["local_tokens"] == 0:
        assert s_c["x_cache"]["level"] == "L2"
        assert s_c["choices"][0]["text"] == s_a["choices"][0]["text"]
    assert line.rep_of(line.c, line.a.peer_id)["failures"] == 0  # honest: never blamed

    # The private entry: the advert of a later shared entry has arrived, yet no node lists it.
    for node in (line.b, line.c):
        assert line.providers(node, private_key) == []
    assert line.complete(line.c, "My private diary entry for today:")["x_cache"]["level"] == "L3"
    stats = line.admin(line.a, "/admin/peers")["stats"]
    assert stats["server"]["served"] >= 1
    cache_a = line.admin(line.a, "/admin/cache", entries=10)["entries"]
    assert any(e["input_sha256"] == private_key and e["privacy_flag"] for e in cache_a)


def test_liar_is_caught_banned_and_evidence_spreads(line: Line) -> None:
    with Peers() as ps:
        evil = ps.start(
            "--model", "--evil", "--bootstrap", line.b.ready["addrs"][0], ready_timeout=120
        )
        evil.call("wait_mesh", n=1)
        ids = {line.a.peer_id: "A", line.b.peer_id: "B", line.c.peer_id: "C", evil.peer_id: "evil"}
        prompts = ["A haiku about the sea:", "Three facts about owls:", "The capital of Italy is"]
        honest = []
        for i, prompt in enumerate(prompts[:2]):
            params = {"max_tokens": MAX_TOKENS, "temperature": 0}
            ans = evil.call("resolve", prompt=prompt, params=params, share=True, timeout=120)[
                "answer"
            ]
            honest.append(ans)
            assert line.providers(line.c, ans["input_sha256"], wait_s=AD_TIMEOUT_S) == [
                evil.peer_id
            ]
            got = line.complete(line.c, prompt)
            # The altered answer never reaches the client: C kept the tokens before the altered
            # last one (its own choices) and generated the rest itself.
            assert got["x_cache"]["level"] == "L2", got
            timings = got["x_cache"]["timings"]
            assert timings["accepted_tokens"] == len(ans["tokens"]) - 1
            assert timings["local_tokens"] >= 1
            rec = line.rep_of(line.c, evil.peer_id)
            assert rec["failures"] == pytest.approx(
                i + 1, abs=0.01
            )  # caught on each answer, the first included
            assert rec["score"] < 0.5
            assert (
                len(rec["evidence_detail"]) == i + 1
                and rec["evidence_detail"][-1]["accuser"] == line.c.peer_id
            )
            # The lie is self-consistent (text = its tokens): the walk caught the token.
            reason = rec["evidence_detail"][-1]["reason"]
            assert f"token {len(ans['tokens']) - 1}: claimed" in reason, reason
            assert rec["banned"] is (i == 1), rec  # banned after the second proven lie
        assert line.admin(line.c, "/admin/peers")["stats"]["tier"]["verified_failures"] == 2
        assert metric(line, line.c, "p2pcache_verification_failures_total") == 2

        # Evidence reaches A and B; each re-verified it on its own model before acting.
        for node in (line.a, line.b):
            until(
                lambda node=node: (
                    line.admin(node, "/admin/peers")["stats"]["evidence"]["confirmed"] >= 2
                ),
                120,
                f"{node.name} confirms both proofs",
            )
            rec = line.rep_of(node, evil.peer_id)
            assert rec["failures"] == pytest.approx(2, abs=0.01) and rec["banned"], rec
            assert {e["accuser"] for e in rec["evidence_detail"]} == {line.c.peer_id}
            assert line.rep_of(node, line.c.peer_id)["bad"] == 0  # the accuser was right
        # Banned: its new adverts are refused, and C never asks it again.
        ans = evil.call(
            "resolve",
            prompt=prompts[2],
            params={"max_tokens": MAX_TOKENS, "temperature": 0},
            share=True,
            timeout=120,
        )["answer"]
        before = line.admin(line.c, "/admin/peers")["stats"]["tier"]
        got = line.complete(line.c, prompts[2])
        assert got["x_cache"]["level"] == "L3" and got["choices"][0]["text"] == ans["text"]
        after = line.admin(line.c, "/admin/peers")["stats"]["tier"]
        assert after["verified_failures"] == before["verified_failures"] == 2
        assert line.providers(line.c, ans["input_sha256"]) == []
        rows = {
            ids.get(r["peer_id"], r["peer_id"]): r
            for r in line.admin(line.c, "/admin/reputation")["peers"]
        }
        assert rows["evil"]["banned"] and not rows["A"]["banned"]


NEAR_TIE_TOPICS = [
    "the history of tea",
    "how bees make honey",
    "the rules of chess",
    "why leaves change colour",
    "the first airplane",
    "how rainbows form",
    "the life of penguins",
    "how bread rises",
    "the moon landing",
    "why the sea is salty",
    "how volcanoes erupt",
    "the invention of paper",
]


def test_near_tie_liar_never_reaches_the_client_and_its_rate_gets_it_banned(line: Line) -> None:
    """A liar that swaps the honest greedy token for the local runner-up at the closest
    near-tie of its first tokens: each time C serves its own answer (the liar's prefix up to
    the swap saved, the rest computed), a single such divergence costs the peer nothing
    (honest hardware makes them too), but a peer making them far more often than float noise
    explains is banned (a swap outside the noise margin is a proven lie)."""
    with Peers() as ps:
        evil = ps.start(
            "--model",
            "--evil",
            "near-tie",
            "--bootstrap",
            line.b.ready["addrs"][0],
            ready_timeout=120,
        )
        evil.call("wait_mesh", n=1)
        params = {"max_tokens": 24, "temperature": 0}
        rec: dict[str, Any] = {}
        for i, topic in enumerate(NEAR_TIE_TOPICS):
            prompt = f"A short paragraph about {topic}:"
            r = evil.call("resolve", prompt=prompt, params=params, share=True, timeout=120)
            ans, swap = r["answer"], r["evil"]
            key = ans["input_sha256"]
            assert line.providers(line.c, key, wait_s=AD_TIMEOUT_S) == [evil.peer_id]
            got = line.complete(line.c, prompt, max_tokens=24)
            # Never the liar's text: C kept the tokens before the swap and chose its own there.
            text = got["choices"][0]["text"]
            assert text != swap["altered_text"]
            x = got["x_cache"]
            assert x["timings"]["accepted_tokens"] <= swap["position"]
            rec = line.rep_of(line.c, evil.peer_id)
            if swap["margin"] > 0.5:  # outside the noise: a proven lie
                assert rec["failures"] > 0, rec
            elif i == 0 and x["timings"]["accepted_tokens"] == swap["position"]:
                # One near-tie costs nothing: no proof, no penalty, the prefix was saved.
                assert x["level"] == "L2" and rec["failures"] == 0 and rec["evidence"] == []
                assert rec["near_ties"] == pytest.approx(1, abs=0.01)
                assert rec["score"] >= 0.5 and not rec["banned"]
            if rec["banned"]:
                break
        assert rec["banned"], rec


def _identity_sorting_before(data_dir: Path, other: str) -> str:
    """Give a test peer an identity whose id sorts before ``other``: with equal reputation and
    equal expected transfer time, providers are tried in peer id order, so this peer goes first."""
    key = data_dir / "identity.key"
    while True:
        key.unlink(missing_ok=True)
        pid = Identity.load_or_create(key).peer_id
        if pid < other:
            return pid


def _ask_in_background(
    line: Line, node: NodeProcess, prompt: str
) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["doc"] = line.complete(node, prompt)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=ask)
    t.start()
    return t, result


def _answer(t: threading.Thread, result: dict[str, Any]) -> dict[str, Any]:
    t.join(60)
    assert not t.is_alive(), "C did not answer after its provider died"
    assert "error" not in result, result.get("error")
    return result["doc"]


def test_peer_killed_mid_transfer_next_provider_then_l3(line: Line) -> None:
    params = {"max_tokens": MAX_TOKENS, "temperature": 0}
    with Peers() as ps:
        # 1) Two providers: the staller (tried first) dies mid-transfer, B answers.
        d1 = line.tmp / "staller1"
        _identity_sorting_before(d1, line.b.peer_id)
        s1 = ps.start(
            "--model",
            "--stall",
            "--bootstrap",
            line.b.ready["addrs"][0],
            data_dir=d1,
            ready_timeout=120,
        )
        s1.call("wait_mesh", n=1)
        prompt = "A short poem about autumn leaves:"
        on_b = line.complete(line.b, prompt)  # B first, so B never asks the staller
        assert on_b["x_cache"]["level"] == "L3"
        ans = s1.call("resolve", prompt=prompt, params=params, share=True, timeout=120)["answer"]
        key = ans["input_sha256"]
        until(
            lambda: len(line.providers(line.c, key, wait_s=AD_TIMEOUT_S)) == 2,
            AD_TIMEOUT_S,
            "two providers at C",
        )
        t, result = _ask_in_background(line, line.c, prompt)
        s1.wait_event("stalled", 30)  # header and half the body sent
        s1.kill()
        doc = _answer(t, result)
        assert doc["x_cache"]["peer"]["peer"] == line.b.peer_id
        # (the staller may itself have walked B's answer and left it at a near-tie: its entry
        # can differ from B's, so C's answer is compared with B's)
        if doc["x_cache"]["timings"]["local_tokens"] == 0:  # else a near-tie: C finished it
            assert doc["x_cache"]["level"] == "L2"
            assert doc["choices"][0]["text"] == on_b["choices"][0]["text"]
        rec = line.rep_of(line.c, s1.peer_id)
        assert (
            rec["timeouts"] >= 0.99 and rec["bad"] == 0 and rec["failures"] == 0
        )  # gone, not lying

        # 2) The only provider dies mid-transfer: C computes the answer itself (L3).
        s2 = ps.start(
            "--model", "--stall", "--bootstrap", line.b.ready["addrs"][0], ready_timeout=120
        )
        s2.call("wait_mesh", n=1)
        prompt = "Five words that rhyme with light:"
        ans = s2.call("resolve", prompt=prompt, params=params, share=True, timeout=120)["answer"]
        assert line.providers(line.c, ans["input_sha256"], wait_s=AD_TIMEOUT_S) == [s2.peer_id]
        t, result = _ask_in_background(line, line.c, prompt)
        s2.wait_event("stalled", 30)
        s2.kill()
        doc = _answer(t, result)
        assert doc["x_cache"]["level"] == "L3" and doc["choices"][0]["text"] == ans["text"]
        assert line.complete(line.c, prompt)["x_cache"]["level"] == "L0"


def test_hostile_messages_rejected_while_nodes_serve(line: Line) -> None:
    model_hash = line.a.ready["model_hash"]
    with Peers() as ps:
        h = ps.start("--model-hash", model_hash, "--bootstrap", line.b.ready["addrs"][0])
        h.call("wait_mesh", n=1)
        key = "5a" * 32
        first = h.call("sign_ad", key=key, seq=15)["data_hex"]
        h.call("publish_raw", topic="ads", data_hex=first)
        assert line.providers(line.c, key, wait_s=AD_TIMEOUT_S) == [h.peer_id]  # a valid ad passes
        before = {
            n.name: line.admin(n, "/admin/peers")["stats"]["ads"]["rejected"]
            for n in (line.b, line.c)
        }
        good = msgpack.unpackb(
            bytes.fromhex(h.call("sign_ad", key="5b" * 32, seq=16)["data_hex"]), raw=False
        )
        hostile = [
            bytes.fromhex(first),  # replayed
            b"\xc1 not msgpack",  # malformed
            msgpack.packb({**good, "sig": b"\x01" * 64}, use_bin_type=True),  # bad signature
            msgpack.packb(
                {**good, "producer": line.a.peer_id}, use_bin_type=True
            ),  # unsigned by its origin
            bytes.fromhex(
                h.call("sign_ad", key="5c" * 32, seq=17, model_hash="cd" * 32)["data_hex"]
            ),  # wrong model
            msgpack.packb(
                {**good, "addrs": ["/ip4/127.0.0.1/tcp/1" + "0" * 200] * 300}, use_bin_type=True
            ),  # oversize
        ]
        for data in hostile:
            h.call("publish_raw", topic="ads", data_hex=data.hex())
        h.call("publish_raw", topic="evidence", data_hex=b"\x93forged".hex())

        def rejected_all() -> bool:
            now = line.admin(line.b, "/admin/peers")["stats"]["ads"]["rejected"]
            return sum(now.values()) - sum(before["B"].values()) >= len(hostile)

        until(rejected_all, 30, "B rejects every hostile advert")
        rej = line.admin(line.b, "/admin/peers")["stats"]["ads"]["rejected"]
        assert {
            "replay",
            "malformed",
            "bad-signature",
            "unsigned",
            "wrong-model",
            "oversize",
        } <= set(rej), rej
        for node in (line.b, line.c):
            assert line.providers(node, "5b" * 32) == [] and line.providers(node, "5c" * 32) == []
        assert line.admin(line.b, "/admin/peers")["stats"]["evidence"]["rejected"] >= 1

        # A private entry is never served, even to a peer that asks for its exact key.
        private = line.complete(line.b, "Secret plan number nine:", share=False)["x_cache"][
            "input_sha256"
        ]
        shared = line.complete(line.b, "Public fact number nine:")["x_cache"]["input_sha256"]
        asked = h.call("fetch", peer=line.b.peer_id, addrs=line.b.ready["addrs"], key=private)
        assert not asked["fetched"] and asked["error"] == "NotFound"
        assert h.call("fetch", peer=line.b.peer_id, addrs=line.b.ready["addrs"], key=shared)[
            "fetched"
        ]

        # Hostile fetch requests: each gets a clear refusal (or a reset), B keeps serving.
        garbage = [
            b"\x00\x00\x00\x05hello",  # a frame that is not msgpack
            b"\x7f\xff\xff\xff",  # a 2 GB frame length
            (lambda m: len(m).to_bytes(4, "big") + m)(
                msgpack.packb(
                    {"v": 1, "key": "zz", "model_hash": model_hash, "level": "decoder_final"}
                )
            ),  # bad key
            (lambda m: len(m).to_bytes(4, "big") + m)(
                msgpack.packb(
                    {"v": 1, "key": "11" * 32, "model_hash": "cd" * 32, "level": "decoder_final"}
                )
            ),  # wrong model
        ]
        replies = [
            h.call("raw_fetch", peer=line.b.peer_id, addrs=line.b.ready["addrs"], data_hex=g.hex())[
                "reply"
            ]
            for g in garbage
        ]
        assert replies[0]["status"] == "bad_request" and replies[2]["status"] == "bad_request"
        assert replies[1] is None or replies[1]["status"] == "bad_request"
        assert replies[3]["status"] == "not_found"
        assert line.admin(line.b, "/admin/peers")["stats"]["server"]["bad_requests"] >= 2
        doc = line.complete(line.b, "Water boils at")
        assert doc["x_cache"]["level"] in ("L3", "L2")
        for node in (line.a, line.b, line.c):
            assert node.proc.poll() is None
            assert line.http.get(f"{node.url}/healthz").status_code == 200
        assert json.loads(json.dumps(rej))  # (stats are JSON)


def test_cli_peers_and_reputation_of_running_nodes(line: Line) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> Any:
        r = subprocess.run(
            [sys.executable, "-m", "p2pcache", *args], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    peers = cli("peers", "--url", line.b.url, "--json")
    assert peers["peer_id"] == line.b.peer_id
    assert {line.a.peer_id, line.c.peer_id} <= {p["peer_id"] for p in peers["peers"]}
    assert peers["stats"]["ads"]["accepted"] >= 1
    rep = cli("reputation", "--data-dir", str(line.c.data_dir), "--json")  # found through node.json
    assert rep["peer_id"] == line.c.peer_id
    a_row = next(r for r in rep["peers"] if r["peer_id"] == line.a.peer_id)
    assert a_row["successes"] > 0.9 and not a_row["banned"]
    one = cli("reputation", line.a.peer_id, "--url", line.c.url, "--json")
    assert [r["peer_id"] for r in one["peers"]] == [line.a.peer_id] and one["peers"][0][
        "evidence_detail"
    ] == []


def test_new_node_learns_existing_entries_from_its_neighbour(line: Line) -> None:
    prompt = "The three primary colours are"  # C holds it (fetched from A, shared)
    key = line.complete(line.c, prompt)["x_cache"]["input_sha256"]
    rounds = line.admin(line.c, "/admin/peers")["stats"]["published"]["rounds_for_new_mesh_peers"]
    env = {"P2PCACHE_KV_PREFIX": "false"}
    d = start_node(
        "D",
        line.tmp / "d",
        extra=["--n-ctx", "2048", "--bootstrap", line.c.ready["addrs"][0]],
        env=env,
    )
    try:
        until(lambda: mesh_peers(line.http, d) >= 1, MESH_TIMEOUT_S, "D joins C's mesh")
        # C re-announces its inventory when a peer joins its mesh, well before the periodic
        # re-advertisement (30 s): D learns the old entry within seconds.
        until(
            lambda: (
                line.admin(line.c, "/admin/peers")["stats"]["published"][
                    "rounds_for_new_mesh_peers"
                ]
                > rounds
            ),
            15,
            "C re-announces for its new mesh peer",
        )
        assert line.c.peer_id in line.providers(d, key, wait_s=15)
        got = line.complete(d, prompt)
        assert got["x_cache"]["level"] == "L2" and got["x_cache"]["peer"]["verified"] is True
    finally:
        assert stop_all([d]) == {"D": 0}
