"""What the backend takes and returns: plain dataclasses, no llama.cpp import."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TokenHook = Callable[[int], None]
"""Called on the model's thread with each completion token as it is sampled (live streaming)."""

EvalHook = Callable[[int], None]
"""Called on the model's thread after each decode with the number of evaluated positions."""


@dataclass(frozen=True)
class BackendConfig:
    model_path: Path
    n_ctx: int = 8192
    n_batch: int = 512
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp has a GPU, else 0
    flash_attn: bool = False
    # KV cache element types (llama.cpp GGML_TYPE_*): None = f16. Quantized V (q8_0, q4_0)
    # needs flash attention; see p2pcache.kv (the types are part of kv_config).
    type_k: int | None = None
    type_v: int | None = None


@dataclass(frozen=True)
class KvCacheInfo:
    """How the context keeps its KV cache: what a stored KV state depends on."""

    n_swa: int  # sliding-window size of the windowed layers (0: no windowed layers)
    swa_full: bool  # the windowed layers' cache is full-size (cells never move)
    type_k: int  # GGML_TYPE_* of K and V
    type_v: int


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end of generation or a stop string) | "length"
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float


@dataclass(frozen=True)
class Divergence:
    """Where a draft left the local model's choices (`LlamaBackend.follow_draft`).

    ``margin``: logit(local) - logit(claimed) in the local row (raw logits, before any
    sampler); ``rank_gap``: how many places apart the two tokens stand in that row's logit
    order; ``mass_between``: for a sampled request, the probability (at its temperature) of
    the tokens between them, which a seeded draw must cross to move from one to the other.
    Float noise between kernels or hardware moves near-ties only."""

    position: int  # completion position k: the draft's tokens [0, k) were accepted
    claimed: int  # the draft's token at k (the end-of-generation token if it ends at k)
    local: int  # the local sampler's choice at k
    margin: float
    rank_gap: int
    mass_between: float = 0.0


@dataclass(frozen=True)
class DraftOutcome:
    """A draft (a peer's claimed output) walked with the request's own sampler.

    ``generation``: what this node answers, the accepted draft prefix and, after a
    divergence, its own continuation (None when asked for no tail and the draft diverged).
    ``accepted``: draft tokens accepted; ``walk_ms``: the teacher-forced pass and the walk."""

    generation: Generation | None
    accepted: int
    divergence: Divergence | None
    draft_tokens: int
    walk_ms: float

    @property
    def matches(self) -> bool:
        """The local model chose every token of the draft and ended where it ends."""
        return self.divergence is None and self.accepted == self.draft_tokens

    @property
    def local_tokens(self) -> int:
        return 0 if self.generation is None else len(self.generation.tokens) - self.accepted


@dataclass(frozen=True)
class Score:
    """Teacher-forced scores of a completion after a prompt (`LlamaBackend.score`).

    Position j is the completion's token j, predicted from prompt + completion[:j].
    ``logprobs[j]``: log p(token j); ``argmax[j]``: the local model's top token there;
    ``gaps[j]``: logit(argmax) - logit(token j) (0 where the token is the argmax, the
    "tiny logit gap" a verifier allows for cross-hardware float noise); ``top_ids`` /
    ``top_logprobs``: the ``top_k`` best tokens per position (empty lists when top_k=0).
    """

    tokens: list[int]
    logprobs: list[float]
    argmax: list[int]
    gaps: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    prompt_tokens: int
    ms: float  # wall time of the prefill and the log-softmax

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def argmax_agreement(self) -> float:
        """Fraction of positions where the completion's token is the local argmax."""
        if not self.tokens:
            return 1.0
        return sum(a == t for a, t in zip(self.argmax, self.tokens, strict=True)) / len(self.tokens)
