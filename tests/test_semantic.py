"""L1 semantic tier: real MiniLM embeddings, real FAISS, real LMDB, real Gemma 3 270M."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trio
from typer.testing import CliRunner

from p2pcache.backend import BackendWorker, LlamaBackend
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.resolver import Request, Resolver
from p2pcache.semantic import Embedder, SemanticConfig, SemanticTier
from p2pcache.semantic.lexical import lexical_reject
from p2pcache.semantic.tier import phrase_similarity
from p2pcache.store import Store

PARAMS = SamplingParams(max_tokens=24, stop=("\n",))
DATA = Path(__file__).parent / "data" / "semantic_pairs.jsonl"
ADVERSARIAL = Path(__file__).parent / "data" / "l1_adversarial.jsonl"


def qa(text: str) -> str:
    return f"Question: {text}\nAnswer:"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def make(
    store: Store,
    backend: LlamaBackend,
    model_hash: str,
    tmp_path: Path,
    embedder: Embedder,
    **cfg: object,
) -> tuple[Resolver, SemanticTier]:
    worker = BackendWorker(backend)
    tier = SemanticTier(
        store, worker, model_hash, tmp_path / "semantic", SemanticConfig(**cfg), embedder
    )
    identity = Identity.load_or_create(tmp_path / "identity.key")
    return Resolver(store, worker, model_hash, identity, tiers=[tier]), tier


def ask(resolver: Resolver, text: str, semantic: bool = True, params: SamplingParams = PARAMS):  # type: ignore[no-untyped-def]
    return trio.run(resolver.resolve, Request(prompt=qa(text), params=params, semantic=semantic))


# -- the evaluation set and the parts without the LLM ---------------------------------------


def test_evaluation_set_has_300_labelled_pairs_in_thirds() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    labels = [r["label"] for r in rows]
    assert len(rows) >= 300
    assert labels.count("paraphrase") == labels.count("unrelated") == labels.count("near_miss")
    kinds = {r["kind"] for r in rows if r["label"] == "near_miss"}
    assert {"negation", "entity", "number", "unit", "language", "intent"} <= kinds
    assert len({(r["cached"], r["query"]) for r in rows}) == len(rows)


def test_embeddings_are_unit_vectors_and_rank_paraphrases_first(embedder: Embedder) -> None:
    v = embedder.embed(
        [
            "What is the capital of France?",
            "Which city is the capital of France?",
            "How do I bake sourdough bread?",
        ]
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.85 > 0.3 > v[0] @ v[2]


@pytest.mark.parametrize(
    ("new", "old", "reason"),
    [
        ("Convert 5 miles to km.", "Convert 50 miles to km.", "numbers"),
        ("Why is the sky not blue?", "Why is the sky blue?", "negation"),
        ("How do I sort a list in Rust?", "How do I sort a list in Python?", "key terms"),
        ("Who wrote Macbeth?", "Who wrote Hamlet?", "entities"),
        ("Flights from Rome to Paris", "Flights from Paris to Rome", "order"),
        ("What is the smallest planet?", "What is the largest planet?", "opposite"),
        ("Where was the Eiffel Tower built?", "When was the Eiffel Tower built?", "question type"),
        (
            "How do I convert an integer to a string?",
            "How do I convert a string to an integer?",
            "order",
        ),
        ("What eats pandas?", "What do pandas eat?", "order"),
        (
            "How do I sort a dictionary by key?",
            "How do I sort a dictionary by value?",
            "swapped words",
        ),
        ("Who stole the Mona Lisa?", "Who painted the Mona Lisa?", "swapped words"),
    ],
)
def test_lexical_checks_reject_near_misses(
    new: str, old: str, reason: str, embedder: Embedder
) -> None:
    why = lexical_reject(new, old, phrase_similarity(embedder))
    assert why is not None and reason in why


def test_lexical_checks_pass_paraphrases(embedder: Embedder) -> None:
    sim = phrase_similarity(embedder)
    assert (
        lexical_reject("Which city is France's capital?", "What is the capital of France?", sim)
        is None
    )
    assert lexical_reject("How can I exit the Vim editor?", "How do I exit Vim?", sim) is None
    assert (
        lexical_reject("How many ounces make up one pound?", "How many ounces are in a pound?", sim)
        is None
    )
    # A synonym swap passes when the embedder finds the words alike; without it, any swap rejects.
    new, old = "When was the Eiffel Tower constructed?", "When was the Eiffel Tower built?"
    assert lexical_reject(new, old, sim) is None
    assert "swapped words" in (lexical_reject(new, old) or "")


@pytest.mark.parametrize(
    ("new", "old", "reason"),
    [
        ("Do all owls hunt at night?", "Do some owls hunt at night?", "scope"),
        ("Is copper cheaper than silver?", "Is copper more expensive than silver?", "opposite"),
        ("Is a hare faster than a fox?", "Is a hare slower than a fox?", "opposite"),
        ("Is it legal to fish here?", "Is it illegal to fish here?", "opposite"),
        ("Who is the mayor of Lyon?", "Who was the mayor of Lyon?", "tense"),
        ("What is on TV tomorrow?", "What is on TV today?", "time"),
        ("How do I move money to savings?", "How do I move money from savings?", "roles"),
        ("Is a mouse smaller than a rat?", "Is a rat smaller than a mouse?", "roles"),
        ("How do I log in to Jira?", "How do I log out of Jira?", "opposite"),
        ("How do I fold a shirt quickly?", "How do I fold a shirt?", "condition"),
        ("How do I fold a shirt?", "How do I fold a wet shirt?", "condition"),
        ("How do pumps work?", "Why do pumps work?", "question type"),
    ],
)
def test_contrast_checks_reject_one_word_near_misses(
    new: str, old: str, reason: str, embedder: Embedder
) -> None:
    why = lexical_reject(qa(new), qa(old), phrase_similarity(embedder))
    assert why is not None and reason in why, why


def test_contrast_checks_pass_rephrasings(embedder: Embedder) -> None:
    sim = phrase_similarity(embedder)
    for new, old in [
        ("Is a hare quicker than a fox?", "Is a hare faster than a fox?"),  # one pole
        ("Which river is the longest?", "What is the longest river?"),
        ("Which painter painted The Scream?", "Who painted The Scream?"),  # answer-type noun
        ("How many eggs does a hen lay?", "How many eggs are laid by a hen?"),  # do-support
        ("What is the length of the Thames?", "How long is the Thames?"),  # same measure
        ("Should I stretch all the time?", "Should I always stretch?"),  # same scope
    ]:
        assert lexical_reject(qa(new), qa(old), sim) is None, (new, old)


def _adversarial_rows() -> list[dict]:
    return [json.loads(line) for line in ADVERSARIAL.read_text().splitlines() if line.strip()]


def test_adversarial_set_has_300_near_misses_of_many_kinds_in_two_splits() -> None:
    rows = _adversarial_rows()
    near = [r for r in rows if r["label"] == "near_miss"]
    assert len(near) >= 300 and sum(r["label"] == "paraphrase" for r in rows) >= 100
    assert {r["split"] for r in rows} == {"dev", "holdout"}
    assert all(r.keys() >= {"id", "split", "label", "kind", "cached", "query"} for r in rows)
    kinds = {r["kind"] for r in near}
    assert {"negation", "antonym", "comparative", "entity_swap", "number", "date", "unit"} <= kinds
    assert {"order", "quantifier", "condition_added", "condition_dropped"} <= kinds
    for split in ("dev", "holdout"):  # every kind is in both splits
        assert {r["kind"] for r in near if r["split"] == split} == kinds
    assert len({(r["cached"], r["query"]) for r in rows}) == len(rows)


def test_gate_on_a_sample_of_the_adversarial_set(embedder: Embedder) -> None:
    """Every 4th pair of each split and label (fixed, not chosen by outcome): no near-miss
    above tau passes the lexical gate (the model gate only adds refusals), and most
    paraphrases do. The full set is bench/bench_semantic.py's."""
    sim = phrase_similarity(embedder)
    tau = SemanticConfig().tau
    for split in ("dev", "holdout"):
        rows = [r for r in _adversarial_rows() if r["split"] == split]
        for label in ("near_miss", "paraphrase"):
            sample = [r for r in rows if r["label"] == label][::4]
            texts = [qa(t) for r in sample for t in (r["cached"], r["query"])]
            vecs = embedder.embed(texts)
            served = [
                r
                for i, r in enumerate(sample)
                if float(vecs[2 * i] @ vecs[2 * i + 1]) >= tau
                and lexical_reject(qa(r["query"]), qa(r["cached"]), sim) is None
            ]
            if label == "near_miss":
                assert served == [], (split, [(r["cached"], r["query"]) for r in served])
            else:
                assert len(served) >= 0.6 * len(sample), (split, len(served), len(sample))


# -- the backend's teacher-forced scoring -----------------------------------------------------


@pytest.mark.model
def test_score_reports_per_token_logprobs_argmax_and_top_k(backend: LlamaBackend) -> None:
    prompt = backend.tokenize(qa("What is the capital of France?"))
    gen = backend.generate(prompt, SamplingParams(max_tokens=12))
    s = backend.score(prompt, gen.tokens, top_k=3)
    assert len(s.logprobs) == len(s.argmax) == len(s.gaps) == len(s.top_ids) == len(gen.tokens)
    assert all(lp <= 0 for lp in s.logprobs) and all(g >= 0 for g in s.gaps)
    # Greedy output is the model's argmax (batched prefill may differ from decode by float noise).
    assert s.argmax_agreement >= 0.9
    for j, tok in enumerate(gen.tokens):
        assert s.top_ids[j][0] == s.argmax[j]
        assert s.top_logprobs[j] == sorted(s.top_logprobs[j], reverse=True)
        if s.argmax[j] == tok:
            assert s.gaps[j] == 0 and s.logprobs[j] == pytest.approx(s.top_logprobs[j][0], abs=1e-4)
    # A wrong answer scores lower; generation afterwards is unchanged (the KV is reset).
    wrong = backend.tokenize(
        " Berlin is a city in Germany",
    )[1:]
    assert backend.score(prompt, wrong).mean_logprob < s.mean_logprob - 1
    assert backend.generate(prompt, SamplingParams(max_tokens=12)).tokens == gen.tokens


# -- L1 end to end -------------------------------------------------------------------------------


@pytest.mark.model
def test_paraphrase_is_served_from_l1_with_scores(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    first = ask(resolver, "What is the capital of France?")
    assert first.cache_level == "L3" and "Paris" in first.text
    entry = store.get(first.input_sha256)
    assert entry is not None and entry.embedding == 0  # the FAISS id lives in the entry

    para = ask(resolver, "Which city is the capital of France?")
    assert para.cache_level == "L1"
    assert para.text == first.text and para.tokens == first.tokens
    assert para.input_sha256 != first.input_sha256
    assert para.semantic.source_input_sha256 == first.input_sha256
    assert para.semantic.similarity >= tier.config.tau
    gate = para.semantic.gate
    assert gate["accepted"] and gate["delta"] >= -tier.config.margin and gate["scored_tokens"] > 0
    assert resolver.computations == 1

    # Opt-in per request: the same paraphrase without semantic=True is computed (L3).
    assert ask(resolver, "Which city is the capital of France?", semantic=False).cache_level == "L3"
    # Different sampling parameters never reuse the answer.
    other = PARAMS.with_(max_tokens=25)
    assert ask(resolver, "What is France's capital city?", params=other).cache_level == "L3"


@pytest.mark.model
@pytest.mark.parametrize(
    ("cached", "near", "reason"),
    [
        (
            "How do I sort a dictionary by value in Python?",
            "How do I sort a dictionary by key in Python?",
            "swapped words",
        ),
        ("What is 12 times 8?", "What is 12 times 9?", "numbers"),
        ("Why is the sky blue?", "Why is the sky not blue?", "negation"),
        ("When was the Eiffel Tower built?", "Where was the Eiffel Tower built?", "question type"),
    ],
)
def test_near_miss_is_rejected_by_the_gate(
    store: Store,
    backend: LlamaBackend,
    default_model_hash: str,
    tmp_path: Path,
    embedder: Embedder,
    cached: str,
    near: str,
    reason: str,
) -> None:
    # Default settings. The near-miss is above tau, so similarity alone would serve the cached
    # answer: only the gate stands between it and a wrong answer.
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    first = ask(resolver, cached)
    assert first.cache_level == "L3"
    sim = float(embedder.embed_one(qa(near)) @ tier.index.get(first.input_sha256).vec())
    assert sim >= tier.config.tau
    answer = ask(resolver, near)
    assert answer.cache_level == "L3" and resolver.computations == 2
    assert tier.gate_rejections == 1 and tier.hits == 0
    assert tier.last_gate is not None and not tier.last_gate.accepted
    assert reason in tier.last_gate.reason


@pytest.mark.model
def test_unrelated_prompt_below_tau_never_reaches_the_gate(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    assert ask(resolver, "What is the capital of France?").cache_level == "L3"
    near = ask(resolver, "What is the capital of Germany?")  # cosine 0.68 < tau 0.85
    assert near.cache_level == "L3" and "Paris" not in near.text
    assert tier.gate_rejections == 0 and tier.last_gate is None


@pytest.mark.model
def test_model_gate_alone_rejects_a_near_miss_that_similarity_accepts(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    # Lexical checks off: only the teacher-forced log-prob decides.
    resolver, tier = make(
        store, backend, default_model_hash, tmp_path, embedder, lexical=False, tau=0.6
    )
    cached = ask(resolver, "What is the capital of France?")
    vec = embedder.embed_one(qa("What is the capital of Germany?"))
    sim = float(vec @ tier.index.get(cached.input_sha256).vec())
    assert sim >= 0.6  # similarity alone would serve "Paris" for Germany
    near = ask(resolver, "What is the capital of Germany?")
    assert near.cache_level == "L3" and tier.gate_rejections == 1
    assert tier.last_gate is not None and tier.last_gate.delta is not None
    assert tier.last_gate.delta < -tier.config.margin  # "Paris" is far less likely after "Germany"


@pytest.mark.model
def test_node_without_semantic_never_serves_l1(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path
) -> None:
    identity = Identity.load_or_create(tmp_path / "identity.key")
    resolver = Resolver(store, BackendWorker(backend), default_model_hash, identity)
    assert ask(resolver, "What is the capital of France?").cache_level == "L3"
    assert ask(resolver, "Which city is the capital of France?").cache_level == "L3"


@pytest.mark.model
def test_index_survives_restart_and_is_rebuilt_when_deleted_or_corrupt(
    backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    store = Store(tmp_path / "store")
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    keys = [
        ask(resolver, q).input_sha256
        for q in ("What is the capital of France?", "Who wrote Hamlet?")
    ]
    tier.close()
    store.close()
    index_file = tmp_path / "semantic" / f"{default_model_hash}.faiss"
    assert index_file.is_file()

    def reopen() -> tuple[Store, Resolver, SemanticTier]:
        s = Store(tmp_path / "store")
        r, t = make(s, backend, default_model_hash, tmp_path, embedder)
        return s, r, t

    # 1. restart: the snapshot is loaded as is
    store, resolver, tier = reopen()
    assert not tier.index.rebuilt and len(tier.index) == 2
    assert ask(resolver, "Who is the author of Hamlet?").cache_level == "L1"
    tier.close()
    store.close()

    # 2. file deleted: rebuilt from LMDB, same ids, still serves
    index_file.unlink()
    store, resolver, tier = reopen()
    assert tier.index.rebuilt and len(tier.index) == 2
    assert {tier.index.get(k).faiss_id for k in keys} == {0, 1}
    assert ask(resolver, "Which city is the capital of France?").cache_level == "L1"
    tier.close()
    store.close()

    # 3. file corrupted (one byte flipped): the checksum catches it, rebuilt
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 0xFF
    index_file.write_bytes(bytes(data))
    store, resolver, tier = reopen()
    assert tier.index.rebuilt and len(tier.index) == 2
    assert ask(resolver, "Which city is the capital of France?").cache_level == "L1"
    tier.close()
    store.close()


@pytest.mark.model
def test_records_added_after_the_snapshot_are_caught_up(
    backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    store = Store(tmp_path / "store")
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder, save_every=1000)
    tier.index.save()  # empty snapshot, then two inserts that are only in LMDB (as after a crash)
    ask(resolver, "What is the capital of France?")
    ask(resolver, "Who wrote Hamlet?")
    store.close()  # no tier.close(): the snapshot on disk is stale
    store = Store(tmp_path / "store")
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    assert not tier.index.rebuilt and len(tier.index) == 2
    assert ask(resolver, "Who is the author of Hamlet?").cache_level == "L1"
    store.close()


@pytest.mark.model
def test_evicted_entry_is_not_served_and_its_record_is_dropped(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    first = ask(resolver, "What is the capital of France?")
    store.delete(first.input_sha256)
    assert ask(resolver, "Which city is the capital of France?").cache_level == "L3"
    assert tier.index.get(first.input_sha256) is None


@pytest.mark.model
def test_cli_similar_shows_nearest_entries_with_scores(
    backend: LlamaBackend, default_model_hash: str, tmp_path: Path, embedder: Embedder
) -> None:
    from p2pcache.cli.main import app

    store = Store(tmp_path / "store")
    resolver, tier = make(store, backend, default_model_hash, tmp_path, embedder)
    ask(resolver, "What is the capital of France?")
    ask(resolver, "Who wrote Hamlet?")
    tier.close()
    store.close()
    result = CliRunner().invoke(
        app,
        [
            "cache",
            "similar",
            qa("Which city is France's capital?"),
            "--data-dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)["neighbours"]
    assert [n["prompt"] for n in out] == [
        qa("What is the capital of France?"),
        qa("Who wrote Hamlet?"),
    ]
    assert out[0]["similarity"] > 0.85 > out[1]["similarity"]
    assert out[0]["lexical"] == "ok" and "Paris" in out[0]["answer"]


@pytest.mark.model
def test_http_node_serves_l1_only_when_asked_and_reports_scores(tmp_path: Path) -> None:
    # A real node process with L1 on (node config through the environment), over HTTP.
    import httpx

    from p2pcache.node.cluster import start_node

    node = start_node(
        "semantic",
        tmp_path / "node",
        extra=("--n-ctx", "1024"),
        env={
            "P2PCACHE_SEMANTIC": "true",
            "P2PCACHE_SEMANTIC_TAU": "0.85",
            "P2PCACHE_SEMANTIC_MARGIN": "1.0",
        },
    )
    try:
        model = httpx.get(node.url + "/v1/models", timeout=30).json()["data"][0]["id"]

        def complete(text: str, **extra: object) -> dict:
            body = {"model": model, "prompt": qa(text), "max_tokens": 24, "stop": ["\n"], **extra}
            r = httpx.post(node.url + "/v1/completions", json=body, timeout=180)
            assert r.status_code == 200, r.text
            return r.json()

        first = complete("What is the capital of France?")
        assert first["x_cache"]["level"] == "L3" and "semantic" not in first["x_cache"]
        # With "semantic": true a paraphrase is served from L1; without it, computed.
        para = complete("What city is the capital of France?", semantic=True)
        x = para["x_cache"]
        assert x["level"] == "L1" and para["choices"][0]["text"] == first["choices"][0]["text"]
        assert x["semantic"]["similarity"] >= x["semantic"]["tau"] == 0.85
        assert x["semantic"]["source_input_sha256"] == first["x_cache"]["input_sha256"]
        assert x["semantic"]["gate"]["accepted"] and x["semantic"]["gate"]["scored_tokens"] > 0
        assert complete("Which city is the capital of France?")["x_cache"]["level"] == "L3"
        # A bad type for the flag is a clear 4xx, and the node keeps serving.
        bad = httpx.post(
            node.url + "/v1/completions",
            json={"model": model, "prompt": "x", "semantic": "yes"},
            timeout=30,
        )
        assert bad.status_code == 400 and "semantic" in bad.text
        assert complete("What is the capital of France?")["x_cache"]["level"] == "L0"
    finally:
        assert node.stop() == 0, node.log_tail()
