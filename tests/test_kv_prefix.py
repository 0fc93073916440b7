"""KV prefix states on the real model (Gemma 3 270M, sliding-window layers).

Resumed greedy output must equal the cold run token for token; a kv_config mismatch must
never restore; a corrupt chunk must be detected and fall back to prefill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
import trio

from p2pcache.backend import BackendConfig, LlamaBackend
from p2pcache.keys import SamplingParams
from p2pcache.kv import KvChunkStore, KvPolicy, KvPrefixCache, chunk_hashes, kv_backend_options
from p2pcache.kv.state_format import build_state, parse_state
from p2pcache.resolver import Request, Resolver
from p2pcache.store import Store

pytestmark = pytest.mark.model

C = 16
GREEDY = SamplingParams(max_tokens=24)


def long_text(topic: str, n: int) -> str:
    return " ".join(
        f"{topic} note {i}: item {i} weighs {i * 7 % 101} grams and costs {i * 13 % 97} coins."
        for i in range(n)
    )


@pytest.fixture
def kv(backend: LlamaBackend, store: Store, default_model_hash: str) -> Iterator[KvPrefixCache]:
    yield KvPrefixCache(backend, KvChunkStore(store), default_model_hash, KvPolicy(chunk_tokens=C))


def run_kv(kv: KvPrefixCache, tokens: list[int], params: SamplingParams = GREEDY):  # type: ignore[no-untyped-def]
    pg = kv.generate(tokens, params)
    kv.store(pg.pending)
    return pg


def test_state_layout_round_trips(kv: KvPrefixCache, backend: LlamaBackend) -> None:
    """Cutting a real state into rows and rebuilding it gives the same bytes (past the
    sliding window, so both caches are exercised)."""
    tokens = backend.tokenize(long_text("roundtrip", 28))
    assert len(tokens) > 560
    backend.reset()
    backend.prefill(tokens)
    original = bytes(backend.read_state(kv.buf))
    layout, sections = parse_state(original)
    assert layout == kv.layout and len(sections) == 2
    assert list(sections[0].positions) == list(range(len(tokens)))
    assert list(sections[1].positions) == list(range(len(tokens) - kv.n_swa, len(tokens)))
    rows = [[([k], [v]) for k, v in zip(s.k, s.v, strict=False)] for s in sections]
    size = build_state(layout, [s.positions for s in sections], rows, kv.buf)
    assert bytes(kv.buf.view(size)) == original


@pytest.mark.parametrize("topic", ["apples", "rivers", "chat"])
def test_resumed_greedy_equals_cold(kv: KvPrefixCache, backend: LlamaBackend, topic: str) -> None:
    if topic == "chat":
        tokens = backend.chat_tokens(
            [
                {"role": "system", "content": long_text("policy", 27)},
                {"role": "user", "content": "Summarize note 3."},
            ]
        )
    else:
        tokens = backend.tokenize(long_text(topic, 28) + " The heaviest item is")
    assert len(tokens) > 560
    cold = backend.generate(tokens, GREEDY)
    for prefix_len in (40, 530):  # inside the 512-token window, and past it
        kv.chunks.purge()
        stored = run_kv(kv, tokens[:prefix_len], SamplingParams(max_tokens=1))
        assert stored.cached_tokens == 0 and stored.pending.chunks
        resumed = run_kv(kv, tokens)
        assert resumed.cached_tokens == prefix_len // C * C
        assert resumed.generation.tokens == cold.tokens, (
            f"diverged after a {prefix_len}-token prefix"
        )
    again = run_kv(kv, tokens)  # everything but the last partial chunk is now stored
    assert again.cached_tokens == (len(tokens) - 1) // C * C
    assert again.generation.tokens == cold.tokens


def continue_greedy(
    backend: LlamaBackend, tokens: list[int], start: int, n: int, align: int
) -> list[int]:
    """Reference for a resumed run: the *live* context cut back to ``start`` (possible here:
    the SWA cache is full-size), the rest prefilled in the same aligned batches, then greedy."""
    llm = backend.llm
    assert llm.n_tokens >= start and list(llm.input_ids[:start]) == tokens[:start]
    llm.n_tokens = pos = start  # the next eval removes the cells from `start` on
    while pos < len(tokens):
        end = min(len(tokens), (pos // align + 1) * align)
        llm.eval(tokens[pos:end])
        pos = end
    p = GREEDY
    sampler = llm._init_sampler(
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        temp=p.temperature,
        repeat_penalty=p.repeat_penalty,
    )
    out: list[int] = []
    token = sampler.sample(llm._ctx, -1)
    while not backend.is_eog(token):
        out.append(token)
        if len(out) >= n:
            break
        llm.eval([token])
        token = sampler.sample(llm._ctx, -1)
    return out


def test_answer_chunks_captured_across_the_window(
    backend: LlamaBackend, store: Store, default_model_hash: str
) -> None:
    """With store_generated, decode crosses position 512: the windowed rows of generated
    tokens are captured during decode, and the next turn (prompt + answer + more) resumes
    past them exactly as if the context had been kept alive."""
    kv = KvPrefixCache(
        backend,
        KvChunkStore(store),
        default_model_hash,
        KvPolicy(chunk_tokens=C, store_generated=True),
    )
    prompt = backend.tokenize(long_text("window", 22))
    assert 420 < len(prompt) < 500
    first = kv.generate(prompt, SamplingParams(max_tokens=100))
    assert len(first.generation.tokens) == 100
    follow = prompt + first.generation.tokens + backend.tokenize(" Next, the lightest item is")[1:]
    stored = (len(prompt) + 99) // C * C  # every full chunk of prompt + evaluated answer
    assert stored > 512
    live = continue_greedy(backend, follow, stored, GREEDY.max_tokens, kv.capture_every)
    kv.store(first.pending)
    resumed = run_kv(kv, follow)
    assert resumed.cached_tokens == stored
    assert resumed.generation.tokens == live


def test_kv_config_mismatch_never_restores(
    kv: KvPrefixCache,
    backend: LlamaBackend,
    store: Store,
    default_model_hash: str,
    model_path: Path,
) -> None:
    tokens = backend.tokenize(long_text("mismatch", 12))
    run_kv(kv, tokens)
    assert run_kv(kv, tokens).cached_tokens > 0
    # Another chunk size: another config, another chain.
    other_chunk = KvPrefixCache(
        backend, KvChunkStore(store), default_model_hash, KvPolicy(chunk_tokens=32)
    )
    assert other_chunk.config != kv.config
    assert chunk_hashes(other_chunk.config, tokens)[0] not in set(chunk_hashes(kv.config, tokens))
    assert other_chunk.generate(tokens, GREEDY).cached_tokens == 0
    # Another KV type (q8_0 K and V): the same store holds only f16 chunks of this prefix.
    q8 = LlamaBackend(
        BackendConfig(model_path=model_path, n_ctx=1024, **kv_backend_options("q8_0"))
    )  # type: ignore[arg-type]
    try:
        kv_q8 = KvPrefixCache(q8, KvChunkStore(store), default_model_hash, KvPolicy(chunk_tokens=C))
        assert kv_q8.config is not None and kv_q8.config.type_k == "q8_0"
        assert kv_q8.chunk_bytes < kv.chunk_bytes
        resumed = kv_q8.generate(tokens, GREEDY)
        assert resumed.cached_tokens == 0
        assert resumed.generation.tokens == q8.generate(tokens, GREEDY).tokens
    finally:
        q8.llm.close()


def test_corrupt_chunk_falls_back_to_prefill(
    kv: KvPrefixCache, backend: LlamaBackend, store: Store
) -> None:
    tokens = backend.tokenize(long_text("corrupt", 8))
    cold = backend.generate(tokens, GREEDY)
    run_kv(kv, tokens)
    assert kv.config is not None
    victim = chunk_hashes(kv.config, tokens)[5]
    with store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(victim, db=kv.chunks._chunks))
        raw[1000] ^= 0x40
        txn.put(victim, bytes(raw), db=kv.chunks._chunks)
    resumed = run_kv(kv, tokens)
    assert resumed.cached_tokens == 5 * C, "the prefix must stop before the corrupt chunk"
    assert resumed.generation.tokens == cold.tokens
    assert kv.chunks.stats().corrupt_dropped == 1
    assert kv.chunks.present([victim]) == [True]  # stored again, intact
    assert run_kv(kv, tokens).cached_tokens == (len(tokens) - 1) // C * C


def test_shared_prefix_is_stored_once_and_evicted_by_cap(
    backend: LlamaBackend, store: Store, default_model_hash: str
) -> None:
    chunks = KvChunkStore(store)
    kv = KvPrefixCache(
        backend, chunks, default_model_hash, KvPolicy(chunk_tokens=C, store_generated=False)
    )
    system = long_text("shared", 10)
    for q in ("Which item is heaviest?", "Which item is cheapest?", "How many items are there?"):
        run_kv(
            kv,
            backend.chat_tokens(
                [{"role": "system", "content": system}, {"role": "user", "content": q}]
            ),
            SamplingParams(max_tokens=4),
        )
    s = chunks.stats()
    assert s.dedup_ratio > 2.5, s
    assert s.lookups == 3 and s.lookup_hits == 2 and 0 < s.token_hit_rate < 1
    # A cap of four chunks. A 7-chunk prompt stores only the head that fits (a tail without
    # its head is useless); a later prompt evicts the least recently used chain; the cap
    # holds and answers stay correct.
    small = KvChunkStore(store, size_cap=4 * (kv.chunk_bytes + 64))
    small.purge()
    kv_small = KvPrefixCache(backend, small, default_model_hash, KvPolicy(chunk_tokens=C))
    first = backend.tokenize(long_text("evict", 6))
    assert len(first) >= 7 * C
    pg = run_kv(kv_small, first)
    st = small.stats()
    assert st.chunks == 4 and st.bytes <= small.size_cap and st.evictions == 0
    assert small.present(chunk_hashes(kv_small.config, first)[:4]) == [True] * 4
    cold_first = backend.generate(first, GREEDY).tokens
    assert pg.generation.tokens == cold_first
    resumed = run_kv(kv_small, first)
    assert resumed.cached_tokens == 4 * C and resumed.generation.tokens == cold_first
    # Its tail (chunks 4-6) may not push out its own head.
    assert small.stats().evictions == 0
    assert small.present(chunk_hashes(kv_small.config, first)[:4]) == [True] * 4
    second = backend.tokenize(long_text("other", 6))
    assert run_kv(kv_small, second).cached_tokens == 0
    st = small.stats()
    assert st.chunks == 4 and st.bytes <= small.size_cap and st.evictions == 4
    assert kv_small.generate(first, GREEDY).cached_tokens == 0  # least recently used: gone
    assert kv_small.generate(second, GREEDY).cached_tokens == 4 * C


def test_resolver_reuses_the_previous_chat_turn(
    resolver: Resolver, store: Store, default_model_hash: str
) -> None:
    backend = resolver.worker.backend
    kv = KvPrefixCache(backend, KvChunkStore(store), default_model_hash, KvPolicy(chunk_tokens=C))
    resolver = Resolver(store, resolver.worker, default_model_hash, resolver.identity, kv=kv)
    params = SamplingParams(max_tokens=20)
    history = [
        {"role": "system", "content": long_text("tour", 8)},
        {"role": "user", "content": "Name an item."},
    ]
    t1 = trio.run(resolver.resolve, Request(messages=tuple(history), params=params))
    assert t1.cache_level == "L3" and t1.timings.cached_prompt_tokens == 0
    history += [
        {"role": "assistant", "content": t1.text},
        {"role": "user", "content": "And another one?"},
    ]
    t2 = trio.run(resolver.resolve, Request(messages=tuple(history), params=params))
    assert t2.cache_level == "L3"
    assert t2.timings.cached_prompt_tokens >= t1.timings.prompt_tokens // C * C
    # A cold run of the same request: the chat format's stops are part of its params.
    chat_params = params.with_(stop=backend.chat_format.stops)
    assert t2.tokens == backend.generate(backend.chat_tokens(history), chat_params).tokens
    # The identical request is still an L0 hit (decoder_final first, KV prefixes after).
    assert (
        trio.run(resolver.resolve, Request(messages=tuple(history), params=params)).cache_level
        == "L0"
    )


def test_chat_cli_and_stats(tmp_path: Path) -> None:
    env = {**os.environ, "P2PCACHE_DATA_DIR": str(tmp_path)}
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pcache",
            "chat",
            "-n",
            "12",
            "--n-ctx",
            "1024",
            "--json",
            "--system",
            long_text("cli", 4),
        ],
        input="Name one item.\nName another.\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    turns = [json.loads(chunk) for chunk in chat.stdout.replace("}\n{", "}\n\x00{").split("\x00")]
    assert len(turns) == 2
    assert turns[0]["timings"]["cached_prompt_tokens"] == 0
    assert (
        turns[1]["timings"]["cached_prompt_tokens"] >= turns[0]["timings"]["prompt_tokens"] // C * C
    )
    stats = subprocess.run(
        [sys.executable, "-m", "p2pcache", "cache", "stats", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    kv = json.loads(stats.stdout)["kv"]
    assert kv["chunks"] > 0 and kv["bytes"] > 0
    assert kv["lookups"] == 2 and kv["prefix_hit_rate"] == 0.5
    assert kv["dedup_ratio"] > 1.0
    table = subprocess.run(
        [sys.executable, "-m", "p2pcache", "cache", "stats"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    for row in ("KV chunks", "KV bytes", "KV dedup ratio", "KV prefix hit rate"):
        assert row in table


def test_sampled_output_resumes_identically(kv: KvPrefixCache, backend: LlamaBackend) -> None:
    tokens = backend.tokenize(long_text("sampled", 8))
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=16)
    cold = backend.generate(tokens, params)
    run_kv(kv, tokens, params)
    resumed = kv.generate(tokens, params)
    assert resumed.cached_tokens > 0 and resumed.generation.tokens == cold.tokens
    assert llama_cpp.llama_model_n_swa(backend.llm._model.model) == kv.n_swa > 0


def test_cli_kv_type_option(tmp_path: Path) -> None:
    """--kv-type reaches the backend: q8_0 answers; an unknown type is a clear error."""
    env = {**os.environ, "P2PCACHE_DATA_DIR": str(tmp_path)}
    base = [sys.executable, "-m", "p2pcache", "generate", "--n-ctx", "512", "-n", "4", "--json"]
    bad = subprocess.run(
        base + ["--kv-type", "q9", "Hello"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "unknown KV type" in bad.stderr
    ok = subprocess.run(
        base + ["--kv-type", "q8_0", "Hello"], capture_output=True, text=True, env=env, timeout=300
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["cache_level"] == "L3"
