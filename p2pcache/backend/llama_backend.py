"""The llama.cpp backend: tokenization, chat templates and generation.

All methods here block (they run the model); callers on the event loop go through
`p2pcache.backend.worker.BackendWorker`, which moves them to a thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from p2pcache.backend.chat_templates import fallback_template
from p2pcache.keys import SamplingParams

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """Prompt plus max_tokens do not fit in the context window."""


@dataclass(frozen=True)
class BackendConfig:
    model_path: Path
    n_ctx: int = 8192
    n_batch: int = 512
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp has a GPU, else 0
    flash_attn: bool = False


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end of generation or a stop string) | "length"
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float


class LlamaBackend:
    """One llama.cpp model and context. Not thread-safe: use one caller at a time."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        n_gpu = config.n_gpu_layers
        if n_gpu is None:
            n_gpu = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.n_gpu_layers = n_gpu
        self.llm = llama_cpp.Llama(
            model_path=str(config.model_path),
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads,
            n_gpu_layers=n_gpu,
            flash_attn=config.flash_attn,
            verbose=False,
        )
        self._vocab = self.llm._model.vocab
        self._chat = self._make_chat_formatter()

    # -- text <-> tokens --------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Plain completion prompt: BOS + text, as llama.cpp's own completion does."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation after the model's chat template."""
        rendered = self._chat(messages=list(messages)).prompt
        # The template renders BOS itself; special tokens in it are real control tokens.
        return self.llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="ignore")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _make_chat_formatter(self) -> Any:  # llama_cpp's Jinja2ChatFormatter
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        metadata = self.llm.metadata
        template = metadata.get("tokenizer.chat_template") or fallback_template(
            metadata.get("general.architecture", "")
        )

        def text(tok: int) -> str:
            return self.llm._model.token_get_text(tok) if tok != -1 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=text(self.llm.token_eos()),
            bos_token=text(self.llm.token_bos()),
        )

    # -- generation -------------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.config.n_ctx:
            raise PromptTooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context window of {self.config.n_ctx} tokens"
            )

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """Run the model from an empty KV cache. Greedy output is deterministic; sampled
        output is reproducible from ``params.seed``."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        self.check_fits(len(prompt), params.max_tokens)
        llm = self.llm
        llm.reset()  # n_tokens = 0: eval() below clears the whole KV cache first
        llm.set_seed(params.seed)
        grammar = llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False) if params.grammar else None
        sampler = llm._init_sampler(
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            grammar=grammar,
        )
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = sampler.sample(llm._ctx, -1)
        t1 = time.perf_counter()
        out: list[int] = []
        finish = "length"
        cut_text: str | None = None  # text truncated at a stop string
        while True:
            if self.is_eog(token):
                finish = "stop"
                break
            out.append(token)
            if params.stop:
                so_far = self.detokenize(out)
                cut = min((i for s in params.stop if (i := so_far.find(s)) >= 0), default=-1)
                if cut >= 0:
                    cut_text, finish = so_far[:cut], "stop"
                    break
            if len(out) >= params.max_tokens:
                break
            llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
        t2 = time.perf_counter()
        return Generation(
            tokens=out,
            text=cut_text if cut_text is not None else self.detokenize(out),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            prefill_ms=(t1 - t0) * 1000,
            decode_ms=(t2 - t1) * 1000,
        )
