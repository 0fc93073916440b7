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
