"""KV prefixes over the network, between real node daemons on loopback (line A - B - C, C dials
only B; KV prefix reuse on; every KV fetch spot-checked). A long shared prefix computed on A
lets C resume a different question from A's chunks; a private prefix of A never leaves A; a
node serving corrupted chunks (tests/kv_evil_node.py) is caught by C's spot-check and C still
answers correctly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from p2pcache.backend import LlamaBackend
from p2pcache.keys import SamplingParams
from p2pcache.kv.chunk_store import KvChunkStore, NewChunk
from p2pcache.net.fetch import BadResponse, FetchRequest
from p2pcache.net.kv_tier import KvSource, decode_body
from p2pcache.net.wire import WireError
from p2pcache.node.cluster import NodeProcess, stop_all, wait_ready
from p2pcache.store import Store
from tests.net_harness import MESH_TIMEOUT_S, Line, mesh_peers, running_line, until

MAX_TOKENS = 8
C_TOKENS = 16  # chunk size
AD_TIMEOUT_S = 40.0
EVIL = Path(__file__).with_name("kv_evil_node.py")


def system_text(topic: str) -> str:
    """~300 tokens of a fixed reference text (a shared system prompt / document)."""
    facts = [
        f"Rule {i}: every {topic} request numbered {i} must be logged with its owner, its date and "
        f"a short reason, and reviewed by the {topic} desk within {i + 2} days."
        for i in range(1, 12)
    ]
    return (
        f"You are the {topic} assistant of a small library. " + " ".join(facts) + "\n\nQuestion: "
    )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    tmp = tmp_path_factory.mktemp("kvnet")
    env = {
        "P2PCACHE_KV_PREFIX": "true",
        "P2PCACHE_KV_NET": "true",
        "P2PCACHE_KV_SPOT_CHECK_RATE": "1.0",
    }
    with running_line(tmp, ["--n-ctx", "2048", "--log-level", "info"], env) as (a, b, c):
        with httpx.Client(timeout=180) as http:
            yield Line(a, b, c, http, a.ready["model"], tmp, MAX_TOKENS)


def cold(backend: LlamaBackend, prompt: str) -> str:
    """The answer of a cold local run (no stored prefix, no peers) in this process."""
    return backend.generate(backend.tokenize(prompt), SamplingParams(max_tokens=MAX_TOKENS)).text


@pytest.mark.model
def test_shared_prefix_resumed_on_c_from_a_chunks_private_prefix_never_leaves_a(
    net: Line, backend: LlamaBackend
) -> None:
    # A private prefix first, then a shared one: only the shared one's chunks are advertised.
    private = net.complete(net.a, system_text("payroll") + "Who owns request 3?", share=False)
    assert private["x_cache"]["level"] == "L3"
    shared_prompt = system_text("archive") + "Who reviews request 4?"
    on_a = net.complete(net.a, shared_prompt)
    t_a = on_a["x_cache"]["timings"]
    assert on_a["x_cache"]["level"] == "L3" and t_a["prompt_tokens"] >= 250
    n_chunks = t_a["prompt_tokens"] // C_TOKENS  # every full prompt chunk is a fetchable prefix tip
    # C (via B) learns A's decoder_final key and one kv_prefix tip per shared chunk, no more.
    until(
        lambda: net.keys_seen(net.c, net.a.peer_id) >= 1 + n_chunks,
        AD_TIMEOUT_S,
        "A's kv adverts on C",
    )
    assert net.keys_seen(net.c, net.a.peer_id) == 1 + n_chunks
    served_before = net.net_stats(net.a)["server"]["served"]

    # A different question with the same prefix: C fetches A's chunks and resumes from them.
    question = system_text("archive") + "How many days does the desk have for request 9?"
    on_c = net.complete(net.c, question)
    x = on_c["x_cache"]
    assert x["level"] == "L3"
    kv = x["kv_peer"]
    assert kv["peer"] == net.a.peer_id and kv["spot_checked"] is True and kv["rejected"] is False
    assert kv["tokens"] > 200 and kv["tokens"] % C_TOKENS == 0
    assert (
        x["timings"]["cached_prompt_tokens"] == kv["tokens"] == x["timings"]["peer_prompt_tokens"]
    )
    assert net.net_stats(net.a)["server"]["served"] == served_before + 1
    assert on_c["choices"][0]["text"] == cold(backend, question)  # greedy: token for token
    print("kv_peer on C:", kv, x["timings"])
    assert kv["spot_check_diff"] <= 0.5  # same hardware and batches: identical logits
    rep = net.rep_of(net.c, net.a.peer_id)
    assert rep["successes"] > 0 and rep["failures"] == 0

    # The next request with that prefix on C is a local prefix hit: nothing more is fetched.
    again = net.complete(net.c, system_text("archive") + "How often is request 2 reviewed?")
    assert again["x_cache"]["level"] == "L3" and "kv_peer" not in again["x_cache"]
    assert again["x_cache"]["timings"]["cached_prompt_tokens"] >= kv["tokens"]
    assert again["x_cache"]["timings"]["peer_prompt_tokens"] == 0

    # The private prefix: C computes it all itself, A serves nothing.
    served = net.net_stats(net.a)["server"]["served"]
    priv_q = system_text("payroll") + "Who owns request 5?"
    on_c_priv = net.complete(net.c, priv_q)
    assert (
        "kv_peer" not in on_c_priv["x_cache"]
        and on_c_priv["x_cache"]["timings"]["cached_prompt_tokens"] == 0
    )
    assert on_c_priv["choices"][0]["text"] == cold(backend, priv_q)
    assert net.net_stats(net.a)["server"]["served"] == served
    assert net.keys_seen(net.c, net.a.peer_id) == 1 + n_chunks


@pytest.mark.model
def test_corrupted_chunks_caught_by_spot_check_answer_still_correct(
    net: Line, backend: LlamaBackend
) -> None:
    evil_dir = net.tmp / "evil"
    evil_dir.mkdir()
    log = (evil_dir / "node.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EVIL),
            "--data-dir",
            str(evil_dir),
            "--bootstrap",
            net.c.ready["addrs"][0],
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).parent.parent,
    )
    log.close()
    evil = NodeProcess("E", proc, evil_dir, evil_dir / "node.log")
    try:
        wait_ready(evil)
        until(lambda: mesh_peers(net.http, evil) >= 1, MESH_TIMEOUT_S, "E has a mesh peer")
        on_e = net.complete(evil, system_text("museum") + "Who reviews request 1?")
        n_chunks = on_e["x_cache"]["timings"]["prompt_tokens"] // C_TOKENS
        until(
            lambda: net.keys_seen(net.c, evil.peer_id) >= 1 + n_chunks,
            AD_TIMEOUT_S,
            "E's kv adverts on C",
        )

        question = system_text("museum") + "When is request 7 reviewed?"
        on_c = net.complete(net.c, question)
        x = on_c["x_cache"]
        kv = x["kv_peer"]
        assert kv["peer"] == evil.peer_id and kv["spot_checked"] is True and kv["rejected"] is True
        assert kv["tokens"] == 0 and x["timings"]["cached_prompt_tokens"] == 0
        print("spot-check diff of corrupted chunks:", kv.get("spot_check_diff"))
        assert on_c["choices"][0]["text"] == cold(
            backend, question
        )  # the client gets a correct answer
        rep = net.rep_of(net.c, evil.peer_id)
        assert rep["failures"] > 0.9 and rep["successes"] == 0  # (decayed)
        assert net.net_stats(net.c)["kv"]["spot_check_failures"] == 1
        # The bad chunks were dropped: C's own prefill stored its own, so it is now a local hit.
        again = net.complete(net.c, system_text("museum") + "When is request 6 logged?")
        assert (
            "kv_peer" not in again["x_cache"]
            and again["x_cache"]["timings"]["cached_prompt_tokens"] > 200
        )
    finally:
        codes = stop_all([evil])
        if codes.get("E") != 0:
            print(f"--- E log tail ---\n{evil.log_tail(60)}")


@dataclass
class _FakeKv:  # what KvSource reads of a KvPrefixCache
    chunks: KvChunkStore
    chunk_bytes: int


def test_kv_source_serves_only_shared_chunks_of_the_named_chain(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", size_cap=64 << 20)
    try:
        cs = KvChunkStore(store)
        hs = [bytes([i]) * 32 for i in range(4)]
        cs.put_many([NewChunk(h, i, 16, bytes([i]) * 100) for i, h in enumerate(hs)], 0)
        src = KvSource(_FakeKv(cs, 100), "ab" * 32)  # type: ignore[arg-type]

        def req(first: int, end: int, key: bytes | None = None) -> FetchRequest:
            return FetchRequest(
                (key or hs[end - 1]).hex(),
                "ab" * 32,
                "kv_prefix",
                (first, end),
                1 << 20,
                tuple(hs[first:end]),
            )

        assert src.value(req(0, 3)) is None  # nothing marked shared yet: private looks absent
        assert cs.mark_shared(hs[:2] + [b"x" * 32]) == hs[:2]  # absent chunks are not marked
        assert cs.mark_shared(hs[:2]) == []
        assert src.value(req(0, 3)) is None  # chunk 2 is private: the whole range is refused
        body = src.value(req(0, 2))
        assert body is not None and [bytes(p) for p in decode_body(body, hs[:2], 100)] == [
            b"\0" * 100,
            b"\1" * 100,
        ]
        assert src.value(req(1, 2)) is not None
        assert src.value(req(0, 2, key=hs[3])) is None  # key is not the last requested chunk
        assert (
            src.value(
                FetchRequest(hs[1].hex(), "cd" * 32, "kv_prefix", (0, 2), 1 << 20, tuple(hs[:2]))
            )
            is None
        )
        with pytest.raises(BadResponse):
            decode_body(body, [hs[1], hs[0]], 100)  # the body names other chunks than requested
        with pytest.raises(BadResponse):
            decode_body(body[:-1], hs[:2], 100)
        assert [h for h, _ in cs.shared_tips(10)] and {h for h, _ in cs.shared_tips(10)} == set(
            hs[:2]
        )
        assert (
            cs.drop([hs[0]]) == 1 and src.value(req(0, 2)) is None
        )  # the mark goes with the chunk
        assert {h for h, _ in cs.shared_tips(10)} == {hs[1]}
    finally:
        store.close()


def test_kv_fetch_request_round_trip_and_limits() -> None:
    hs = tuple(bytes([i]) * 32 for i in range(3))
    r = FetchRequest(hs[-1].hex(), "ab" * 32, "kv_prefix", (2, 5), 1 << 20, hs)
    assert FetchRequest.from_msg(r.to_msg()) == r
    plain = FetchRequest("cd" * 32, "ab" * 32)
    assert "chunks" not in plain.to_msg() and FetchRequest.from_msg(plain.to_msg()) == plain
    for bad in ([b"short"], ["ab" * 32], [b"x" * 32] * 1025):
        with pytest.raises(WireError):
            FetchRequest.from_msg({**r.to_msg(), "chunks": bad})
