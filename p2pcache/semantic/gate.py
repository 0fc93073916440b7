"""The L1 quality gate: may the answer cached for prompt P be served for prompt Q?

Two independent signals, both must agree:

1. **The local model** (one teacher-forced prefill, `LlamaBackend.score`): the mean
   log-probability of the cached answer's first ``tokens`` tokens under Q must be within
   ``margin`` nats per token of its value under P (the baseline, scored once when the entry
   was indexed). An answer that the model finds much less likely after Q than after P answers
   a different question. Optionally the share of answer tokens that stay the model's argmax
   under Q must reach ``min_agreement``.
2. **Lexical checks** (`p2pcache.semantic.lexical`): numbers, negation, key terms (languages,
   units, formats), named entities, antonyms, the kind of question, the roles of two words,
   and a swapped content word (unless the embedder finds the two words synonyms) must not
   differ: the near-misses that both sentence embeddings and a 270M model are weakest on.
   They run first: they cost microseconds (a swap: one embedding of two words), the model
   a prefill.

The decision and every score go into ``Answer.semantic.gate``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import trio

from p2pcache.backend import BackendWorker
from p2pcache.semantic.lexical import WordSimilarity, lexical_reject

DEFAULT_MARGIN = 1.0
DEFAULT_GATE_TOKENS = 8


@dataclass(frozen=True)
class GateConfig:
    margin: float = DEFAULT_MARGIN  # nats per token the answer may lose under the new prompt
    tokens: int = DEFAULT_GATE_TOKENS  # answer prefix scored (bounds the gate's cost)
    lexical: bool = True
    model: bool = True  # run the teacher-forced check (False: lexical only, for benchmarks)
    min_agreement: float = 0.0


@dataclass
class GateResult:
    accepted: bool
    reason: str  # "ok" or why it was rejected
    new_logprob: float | None = None
    base_logprob: float | None = None
    delta: float | None = None  # new - base (nats per token; >= -margin passes)
    agreement: float | None = None
    scored_tokens: int = 0
    ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Gate:
    def __init__(
        self,
        worker: BackendWorker,
        config: GateConfig = GateConfig(),
        similarity: WordSimilarity | None = None,
    ) -> None:
        self.worker = worker
        self.config = config
        self.similarity = similarity  # lets synonym swaps pass the lexical check

    async def baseline(
        self, prompt_tokens: list[int], answer_tokens: list[int]
    ) -> tuple[float, float, int]:
        """(mean log-prob, argmax agreement, tokens scored) of the answer under its own prompt."""
        part = answer_tokens[: self.config.tokens]
        if not part:
            return 0.0, 1.0, 0
        s = await self.worker.score(prompt_tokens, part)
        return s.mean_logprob, s.argmax_agreement, len(part)

    def check_lexical(self, new_text: str, old_text: str) -> GateResult | None:
        if self.config.lexical and (why := lexical_reject(new_text, old_text, self.similarity)):
            return GateResult(False, f"lexical: {why}")
        return None

    async def check(
        self,
        new_text: str,
        new_tokens: list[int],
        old_text: str,
        answer_tokens: list[int],
        base_logprob: float,
        base_tokens: int,
    ) -> GateResult:
        t0 = time.perf_counter()
        # Off the event loop: a word swap is judged by one embedding (milliseconds).
        if (
            rejected := await trio.to_thread.run_sync(self.check_lexical, new_text, old_text)
        ) is not None:
            rejected.ms = (time.perf_counter() - t0) * 1000
            return rejected
        if not self.config.model:
            return GateResult(True, "ok", ms=(time.perf_counter() - t0) * 1000)
        part = answer_tokens[: base_tokens or self.config.tokens]
        if not part:
            return GateResult(False, "empty answer", ms=(time.perf_counter() - t0) * 1000)
        s = await self.worker.score(new_tokens, part)
        delta = s.mean_logprob - base_logprob
        ok = delta >= -self.config.margin and s.argmax_agreement >= self.config.min_agreement
        reason = (
            "ok"
            if ok
            else (
                f"log-prob fell {-delta:.2f} nats/token (margin {self.config.margin:g})"
                if delta < -self.config.margin
                else f"argmax agreement {s.argmax_agreement:.2f} < {self.config.min_agreement:g}"
            )
        )
        return GateResult(
            accepted=ok,
            reason=reason,
            new_logprob=s.mean_logprob,
            base_logprob=base_logprob,
            delta=delta,
            agreement=s.argmax_agreement,
            scored_tokens=len(part),
            ms=(time.perf_counter() - t0) * 1000,
        )
