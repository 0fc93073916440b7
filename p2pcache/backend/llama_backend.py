"""The llama.cpp backend: tokenization, chat templates and generation.

All methods here block (they run the model); callers on the event loop go through
`p2pcache.backend.worker.BackendWorker`, which moves them to a thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from p2pcache.errors import PromptTooLong  # noqa: F401 - re-exported
from p2pcache.backend.chat_templates import fallback_template
from p2pcache.backend.logit_checks import CheckReducer, TokenChecks
from p2pcache.keys import SamplingParams

log = logging.getLogger(__name__)


TokenHook = Callable[[int], None]
"""Called on the model's thread with each completion token as it is sampled (live streaming)."""


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
        return sum(a == t for a, t in zip(self.argmax, self.tokens)) / len(self.tokens)


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
            type_k=config.type_k,
            type_v=config.type_v,
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

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, on_token: TokenHook | None = None
    ) -> Generation:
        """Run the model from an empty KV cache. Greedy output is deterministic; sampled
        output is reproducible from ``params.seed``. ``on_token`` (live streaming) is called
        on this thread with each completion token as soon as it is sampled; it must not raise."""
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
            if on_token is not None:
                on_token(token)
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

    # -- teacher-forced scoring (verification and quality gates) --------------------------
    def score(
        self, prompt: Sequence[int], completion: Sequence[int], top_k: int = 0, chunk: int = 64,
        merged: bool = False,
    ) -> Score:
        """One teacher-forced prefill of ``prompt + completion``: per completion token its
        log-probability, the local argmax, the logit gap to the argmax and (``top_k`` > 0)
        the top-k alternatives. Used by the L1 quality gate (exact log-probs); verification
        uses the cheaper `check` (same prefill, yes/no answers).

        Starts from an empty KV cache like `generate`, and leaves the context holding
        ``prompt + completion[:-1]`` (``llm.n_tokens`` / ``input_ids`` kept consistent).
        Logits are requested only at the completion positions, ``chunk`` rows at a time
        (a Gemma 3 row is 262k floats = 1 MiB). ``merged=True`` batches as `check` does."""
        import numpy as np

        completion = list(completion)
        n_vocab = self.llm.n_vocab()
        t0 = time.perf_counter()
        # Each block of logit rows is reduced in place, straight from llama.cpp's buffer (valid
        # until the next decode): no copy, no concatenation, one reused exp buffer. With a 262k
        # vocabulary that post-processing cost more than the LM head itself.
        n = len(completion)
        tok = np.asarray(completion, dtype=np.int64)
        logprobs = np.zeros(n, np.float32)
        argmax = np.zeros(n, np.int64)
        gaps = np.zeros(n, np.float32)
        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        step = max(1, min(chunk, self.config.n_batch))
        scratch = np.empty((min(step, max(n, 1)), n_vocab), np.float32)

        def reduce(block: Any, at: int) -> None:
            k = min(block.shape[0], n - at)
            if k <= 0:
                return
            block = block[:k]
            t = tok[at : at + k]
            mx = block.max(axis=1)
            chosen = block[np.arange(k), t]
            argmax[at : at + k] = block.argmax(axis=1)
            tmp = scratch[:k]
            np.subtract(block, mx[:, None], out=tmp)
            np.exp(tmp, out=tmp)
            lse = mx + np.log(tmp.sum(axis=1))
            logprobs[at : at + k] = chosen - lse
            gaps[at : at + k] = mx - chosen
            if top_k > 0:
                part_idx = np.argpartition(-block, top_k, axis=1)[:, :top_k]
                part_val = np.take_along_axis(block, part_idx, axis=1)
                order = np.argsort(-part_val, axis=1)
                top_ids.extend(np.take_along_axis(part_idx, order, axis=1).tolist())
                top_lps.extend((np.take_along_axis(part_val, order, axis=1) - lse[:, None]).tolist())

        self._teacher_forced(prompt, completion, step, reduce, merged=merged)
        return Score(
            tokens=completion,
            logprobs=logprobs.astype(float).tolist(),
            argmax=argmax.astype(int).tolist(),
            gaps=gaps.astype(float).tolist(),
            top_ids=top_ids,
            top_logprobs=top_lps,
            prompt_tokens=len(prompt),
            ms=(time.perf_counter() - t0) * 1000,
        )

    def check(
        self, prompt: Sequence[int], completion: Sequence[int], top_k: int = 0,
        logprob_floor: float | None = None, chunk: int = 128,
    ) -> TokenChecks:
        """What verification asks of the teacher-forced prefill `score` runs: per completion
        token the argmax and the logit gap (as `score` computes them), with ``top_k`` > 0 its
        rank (logits strictly above it), with a ``logprob_floor`` whether its log-prob is below
        it. No log-softmax over the vocabulary except on the rare rows that need it
        (`p2pcache.backend.logit_checks`).

        Batches: the prompt shares its decode with the first output rows, then ``chunk`` rows
        per decode (128 MiB of logits for Gemma 3). Fewer, fuller LM-head products: 256 output
        tokens took ~0.93 s here against ~1.0 s in `score`'s prompt-then-64-row batches."""
        completion = list(completion)
        t0 = time.perf_counter()
        reducer = CheckReducer(completion, self.llm.n_vocab(), top_k=top_k, logprob_floor=logprob_floor)
        self._teacher_forced(prompt, completion, max(1, min(chunk, self.config.n_batch)), reducer,
                             merged=True)
        out = reducer.result()
        out.prompt_tokens = len(prompt)
        out.ms = (time.perf_counter() - t0) * 1000
        return out

    def _teacher_forced(
        self, prompt: Sequence[int], completion: list[int], step: int,
        reduce: Callable[[Any, int], None], merged: bool = False,
    ) -> None:
        """Prefill ``prompt + completion[:-1]`` from an empty KV cache, handing each block of
        logit rows (a view of llama.cpp's buffer, valid until the next decode) to
        ``reduce(block, first_completion_position)``. Row j predicts completion[j].

        ``merged=False`` (`score`): the prompt in its own decodes, then ``step`` completion
        tokens per decode. ``merged=True``: one token stream cut into decodes of at most
        n_batch tokens, each ending after ``step`` logit rows (the first rows ride with the
        prompt). The batching changes llama.cpp's float rounding, not what is computed."""
        import numpy as np

        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + len(completion) > self.config.n_ctx:
            raise PromptTooLong(
                f"prompt + completion ({len(prompt) + len(completion)} tokens) exceed the context "
                f"window of {self.config.n_ctx} tokens"
            )
        llm = self.llm
        n_vocab = llm.n_vocab()
        llm.reset()
        if merged:
            toks = prompt + completion[:-1]
            first = len(prompt) - 1  # the row of the last prompt token predicts completion[0]
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            pos = 0
            while pos < len(toks):
                end = min(len(toks), max(pos, first) + step, pos + self.config.n_batch)
                part = toks[pos:end]
                llm._batch.set_batch(batch=part, n_past=pos, logits_all=True)
                for j in range(min(len(part), first - pos)):  # no logits for earlier prompt tokens
                    llm._batch.batch.logits[j] = False
                llm._ctx.decode(llm._batch)
                llm.input_ids[pos:end] = part
                llm.n_tokens = end
                if end > first:
                    at = max(pos, first)
                    reduce(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(end - at, n_vocab)), at - first)
                pos = end
            return
        llm.eval(prompt)  # logits of the last prompt token only: they predict completion[0]
        reduce(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(1, n_vocab)), 0)
        # Feed completion[:-1] with logits at every position: row i predicts completion[i+1].
        rest = completion[:-1]
        for i in range(0, len(rest), step):
            part = rest[i : i + step]
            n_past = llm.n_tokens
            llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
            llm._batch.set_batch(batch=part, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past : n_past + len(part)] = part
            llm.n_tokens += len(part)
            reduce(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(part), n_vocab)), 1 + i)
