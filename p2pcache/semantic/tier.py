"""L1: serve the cached answer of a paraphrased prompt, when the quality gate agrees.

Opt-in twice: the node must run a `SemanticTier` (``NodeOptions(semantic=True)``) and the
request must ask for it (``Request(semantic=True)``). Every L3 result of a semantic node is
indexed (embedding + the gate's baseline score), whatever the request asked.

A candidate must: be at least ``tau`` similar (cosine), belong to the same model, have the
same sampling parameters and the same context (chat history and system prompt; only the last
user message, or the completion prompt, may differ), still exist in the store, and pass the
`Gate`. At most ``max_gated`` candidates are run through the model per request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from p2pcache.backend import BackendWorker
from p2pcache.resolver import Answer, Keyed, Level, Request, SemanticDetails, answer_from_output
from p2pcache.semantic.embedder import Embedder
from p2pcache.semantic.gate import DEFAULT_GATE_TOKENS, DEFAULT_MARGIN, Gate, GateConfig, GateResult
from p2pcache.semantic.index import DEFAULT_HNSW_THRESHOLD, SemanticIndex
from p2pcache.semantic.lexical import WordSimilarity
from p2pcache.store import Entry, Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_TAU = 0.85


@dataclass(frozen=True)
class SemanticConfig:
    tau: float = DEFAULT_TAU  # cosine similarity a candidate needs
    margin: float = DEFAULT_MARGIN  # gate: nats per token the answer may lose
    gate: bool = True  # False serves on similarity alone (benchmarks only: unsafe)
    lexical: bool = True
    gate_tokens: int = DEFAULT_GATE_TOKENS
    k: int = 4  # neighbours fetched from FAISS
    max_gated: int = 2  # model calls per request at most
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD
    save_every: int = 64


def request_text(request: Request) -> tuple[str, str]:
    """(text to embed, context digest). Only the completion prompt or the last user message
    may differ between a request and the cached prompt it reuses; all else is the context."""
    if request.prompt is not None:
        return request.prompt, hashlib.sha256(b"prompt").hexdigest()
    assert request.messages is not None
    *history, last = request.messages
    content = last.get("content", "")
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    rest = {k: v for k, v in last.items() if k != "content"}
    ctx = msgpack.packb(["chat", list(history), rest], use_bin_type=True, default=str)
    return text, hashlib.sha256(ctx).hexdigest()


def phrase_similarity(embedder: Embedder, cache_size: int = 4096) -> WordSimilarity:
    """Cosine of two short phrases (the lexical check's synonym test), memoized."""

    @functools.lru_cache(maxsize=cache_size)
    def sim(a: str, b: str) -> float:
        v = embedder.embed([a, b])
        return float(v[0] @ v[1])

    return sim


def _canonical_params(params: dict[str, Any]) -> bytes:
    return msgpack.packb(
        msgpack.unpackb(msgpack.packb(params, use_bin_type=True), raw=False), use_bin_type=True
    )


class SemanticTier:
    level: Level = "L1"

    def __init__(
        self,
        store: Store,
        worker: BackendWorker,
        model_hash: str,
        directory: str | Path,
        config: SemanticConfig = SemanticConfig(),
        embedder: Embedder | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.model_hash = model_hash
        self.config = config
        self.embedder = embedder or Embedder()
        self.index = SemanticIndex(
            store,
            directory,
            model_hash,
            self.embedder.dim,
            hnsw_threshold=config.hnsw_threshold,
            save_every=config.save_every,
        )
        self.gate = Gate(
            worker,
            GateConfig(
                margin=config.margin,
                tokens=config.gate_tokens,
                lexical=config.lexical,
            ),
            similarity=phrase_similarity(self.embedder),
        )
        self.hits = 0
        self.gate_rejections = 0
        self.last_gate: GateResult | None = None  # the last candidate's verdict (tests, logs)

    async def embed(self, text: str):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(self.embedder.embed_one, text)

    # -- the ladder ---------------------------------------------------------------------
    async def lookup(self, keyed: Keyed) -> Answer | None:
        request = keyed.request
        if not request.semantic:
            return None
        text, ctx = request_text(request)
        vec = await self.embed(text)
        params = _canonical_params(request.params.to_dict())
        gated = 0
        for sim, rec in self.index.search(vec, self.config.k):
            if sim < self.config.tau or gated >= self.config.max_gated:
                break
            if (
                rec.context != ctx
                or rec.input_sha256 == keyed.key
                or rec.model_hash != keyed.model_hash
            ):
                continue
            entry = self.store.get(rec.input_sha256)
            if entry is None:
                self.index.forget(rec.input_sha256)  # evicted or purged since
                continue
            if entry.cache_level != "decoder_final" or _canonical_params(entry.params) != params:
                continue
            if not self.config.gate:
                result = None
            else:
                gated += 1
                result = await self.gate.check(
                    text,
                    keyed.tokens,
                    rec.text,
                    list(entry.output.tokens),
                    rec.base_logprob,
                    rec.gate_tokens,
                )
                self.last_gate = result
                if not result.accepted:
                    self.gate_rejections += 1
                    log.debug("L1 candidate %s rejected: %s", rec.input_sha256[:12], result.reason)
                    continue
            self.store.record_hit(rec.input_sha256)
            self.hits += 1
            return answer_from_output(
                entry.output,
                keyed,
                self.level,
                semantic=SemanticDetails(
                    similarity=sim,
                    tau=self.config.tau,
                    source_input_sha256=rec.input_sha256,
                    source_prompt=rec.text,
                    gate=result.to_dict() if result is not None else None,
                ),
            )
        return None

    async def on_stored(self, keyed: Keyed, entry: Entry) -> None:
        """Index a fresh L3 result: embed its prompt, score the gate's baseline, record."""
        text, ctx = request_text(keyed.request)
        vec = await self.embed(text)
        base_lp, base_agree, n = await self.gate.baseline(keyed.tokens, list(entry.output.tokens))
        rec = await trio.to_thread.run_sync(
            lambda: self.index.add(
                {
                    "input_sha256": entry.input_sha256,
                    "model_hash": entry.model_hash,
                    "text": text,
                    "context": ctx,
                    "vector": vec.astype("float32").tobytes(),
                    "base_logprob": base_lp,
                    "base_agreement": base_agree,
                    "gate_tokens": n,
                }
            )
        )
        stored = self.store.get(entry.input_sha256)
        if stored is not None and stored.embedding != rec.faiss_id:
            stored.embedding = rec.faiss_id  # the design's entry.embedding = FAISS id
            try:
                await trio.to_thread.run_sync(self.store.put, stored)
            except StoreError as exc:
                log.warning(
                    "could not record the embedding id of %s: %s", entry.input_sha256[:12], exc
                )

    def close(self) -> None:
        self.index.close()
