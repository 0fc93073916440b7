"""The one module that talks to llama.cpp: model loading, tokens, the decode loop,
teacher-forced scoring and the per-sequence KV state.

Every `llama_cpp` call and every use of llama-cpp-python's private members (`_ctx`, `_batch`,
`_model`, samplers) lives here, the way llama-cpp-python keeps its own C wrappers in one file:
a llama-cpp-python upgrade touches this module only. The KV prefix cache (`p2pcache.kv`) and
the network (`p2pcache.net`) drive the model through the public methods below.

All methods block (they run the model) and the context is not thread-safe; callers on the
event loop go through `p2pcache.backend.worker.BackendWorker`, which runs one at a time on a
worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np

from p2pcache.backend.chat_templates import ChatFormat, chat_format
from p2pcache.backend.logit_checks import CheckReducer, TokenChecks
from p2pcache.backend.state_buffer import StateBuffer
from p2pcache.backend.stops import stop_cut
from p2pcache.backend.types import (
    BackendConfig,
    Divergence,
    DraftOutcome,
    EvalHook,
    Generation,
    KvCacheInfo,
    Score,
    TokenHook,
)
from p2pcache.errors import InvalidRequest, PromptTooLong, StateFormatError
from p2pcache.keys import SamplingParams

log = logging.getLogger(__name__)


class LlamaBackend:
    """One llama.cpp model and context. Not thread-safe: use one caller at a time.

    The context holds the KV cells of ``n_tokens`` evaluated positions (`evaluated`). Plain
    generation starts from none (`generate`); the KV prefix cache loads a stored state
    (`load_state`), declares what it holds (`resume`) and continues with the same decode loop
    (`continue_generation`), so both answer alike token for token.
    """

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        n_gpu = config.n_gpu_layers
        if n_gpu is None:
            n_gpu = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.n_gpu_layers = n_gpu
        # The llama-cpp-python object. Tests and benches may use it; the package does not.
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
        # A template, or a plain transcript for a base model (chat requests add its stops).
        self.chat_format: ChatFormat = chat_format(self.llm.metadata)
        self._chat = self._make_chat_formatter()

    def close(self) -> None:
        """Free the model and context (the backend is unusable afterwards)."""
        self.llm.close()

    # -- text <-> tokens --------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Plain completion prompt: BOS + text, as llama.cpp's own completion does."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation after the model's chat format (`chat_format`)."""
        variables = dict(self.chat_format.variables)
        try:
            rendered = self._chat(messages=list(messages), **variables).prompt
        except ValueError as exc:  # the template's raise_exception(): it refuses these messages
            raise InvalidRequest(str(exc)) from exc
        # The template renders BOS itself; special tokens in it are real control tokens.
        return self.llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.detokenize_bytes(tokens).decode("utf-8", errors="ignore")

    def detokenize_bytes(self, tokens: Sequence[int]) -> bytes:
        """The raw bytes of ``tokens`` (a token may end inside a UTF-8 character)."""
        return self.llm.detokenize(list(tokens))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def eog_token(self) -> int:
        """The model's end-of-sequence token (one of its end-of-generation tokens)."""
        return int(self.llm.token_eos())

    @property
    def bos_token(self) -> int:
        return int(self.llm.token_bos())

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def _make_chat_formatter(self) -> Any:  # llama_cpp's Jinja2ChatFormatter
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(tok: int) -> str:
            return self.llm._model.token_get_text(tok) if tok != -1 else ""

        return Jinja2ChatFormatter(
            template=self.chat_format.template,
            eos_token=text(self.llm.token_eos()),
            bos_token=text(self.llm.token_bos()),
        )

    # -- the context: evaluated positions and prefill ---------------------------------
    @property
    def n_tokens(self) -> int:
        """Positions the context holds (evaluated or resumed)."""
        return int(self.llm.n_tokens)

    def evaluated(self) -> list[int]:
        """The tokens at positions 0..n_tokens-1."""
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def reset(self) -> None:
        """Forget the evaluated positions: the next prefill starts at position 0 and drops
        the old cells as it goes (cheap: no memory is touched now)."""
        self.llm.reset()

    def clear_memory(self) -> None:
        """`reset` and empty the KV memory at once (before or after loading a state, whose
        cells must not mix with stale ones)."""
        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm._ctx.ctx), True)

    def resume(self, tokens: Sequence[int]) -> None:
        """Declare that the context holds ``tokens`` at positions 0.. (after `load_state`
        loaded their cells, or to cut the live context back to a prefix of what it holds)."""
        n = len(tokens)
        self.llm.n_tokens = n
        self.llm.input_ids[:n] = tokens

    def prefill(
        self, tokens: Sequence[int], align: int | None = None, on_evaluated: EvalHook | None = None
    ) -> None:
        """Evaluate ``tokens[n_tokens:]`` (the context must hold ``tokens[:n_tokens]``) in
        decodes that end at absolute multiples of ``align`` (default n_batch, at most
        n_batch): a resumed prefill then runs the cold run's batches, so the numerics match.
        ``on_evaluated(n_tokens)`` runs after each decode."""
        llm = self.llm
        step = min(align or self.config.n_batch, self.config.n_batch)
        pos = llm.n_tokens
        while pos < len(tokens):
            end = min(len(tokens), (pos // step + 1) * step)
            llm.eval(tokens[pos:end])
            pos = end
            if on_evaluated is not None:
                on_evaluated(pos)

    def last_logits(self) -> np.ndarray:
        """A copy of the logits after the last evaluated position (they predict the next token)."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- the per-sequence KV state (p2pcache.kv cuts it into chunks) ---------------------
    def kv_cache_info(self) -> KvCacheInfo:
        params = self.llm.context_params
        return KvCacheInfo(
            n_swa=int(llama_cpp.llama_model_n_swa(self.llm._model.model)),
            swa_full=bool(params.swa_full),
            type_k=int(params.type_k),
            type_v=int(params.type_v),
        )

    def read_state(self, buf: StateBuffer, swa_only: bool = False) -> memoryview:
        """Sequence 0's state, written into ``buf`` (grown if needed); a view of its bytes,
        valid until ``buf`` is written again. ``swa_only``: only the windowed layers' cache
        (a partial read, a few MB)."""
        ctx = self.llm._ctx.ctx
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if swa_only else 0
        n = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, flags)
        buf.ensure(n)
        got = llama_cpp.llama_state_seq_get_data_ext(ctx, buf.array, n, 0, flags)
        if got != n:
            raise StateFormatError(f"llama.cpp wrote {got} state bytes, announced {n}")
        return buf.view(n)

    def load_state(self, buf: StateBuffer, size: int) -> bool:
        """Load the first ``size`` bytes of ``buf`` as sequence 0's state. False: llama.cpp
        refused it (the memory may then hold part of it: `clear_memory` before a prefill).
        Follow with `resume` to say which tokens the loaded cells hold."""
        got = llama_cpp.llama_state_seq_set_data_ext(self.llm._ctx.ctx, buf.array, size, 0, 0)
        return bool(got == size)

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
        self.reset()  # n_tokens = 0: the prefill clears the old cells as it goes
        return self.continue_generation(prompt, params, on_token)

    def continue_generation(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_token: TokenHook | None = None,
        *,
        align: int | None = None,
        on_evaluated: EvalHook | None = None,
        started: float | None = None,
    ) -> Generation:
        """The decode loop of plain and KV-resumed generation: prefill what the context lacks
        of ``prompt`` (it holds ``prompt[:n_tokens]``, at least one token short), then sample
        until end of generation, a stop string or ``max_tokens``.

        ``align`` and ``on_evaluated`` as in `prefill` (``on_evaluated`` also runs after each
        decoded token); ``started``: the `time.perf_counter` the prefill time counts from
        (a restore before this call belongs to it)."""
        prompt = list(prompt)
        if self.n_tokens >= len(prompt):
            raise ValueError("the context must lack at least one prompt token (its logits)")
        sampler = self._sampler(params)
        t0 = time.perf_counter() if started is None else started
        self.prefill(prompt, align, on_evaluated)
        token = sampler.sample(self.llm._ctx, -1)
        t1 = time.perf_counter()
        out: list[int] = []
        finish, cut_text = self._decode_loop(sampler, token, out, params, on_token, on_evaluated)
        t2 = time.perf_counter()
        return Generation(
            tokens=out,
            text=cut_text if cut_text is not None else self.detokenize(out),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            prefill_ms=(t1 - t0) * 1000,
            decode_ms=(t2 - t1) * 1000,
        )

    def _decode_loop(
        self,
        sampler: Any,
        token: int,
        out: list[int],
        params: SamplingParams,
        on_token: TokenHook | None,
        on_evaluated: EvalHook | None = None,
    ) -> tuple[str, str | None]:
        """From ``token`` (just sampled, not yet evaluated; the context holds everything
        before it): emit, evaluate, sample, until the output ends. Appends to ``out``;
        returns the finish reason and, for a stop string, the text cut before it."""
        llm, ctx = self.llm, self.llm._ctx
        while True:
            if self.is_eog(token):
                return "stop", None
            ended = self._emit(token, out, params, on_token)
            if ended is not None:
                return ended
            llm.eval([token])
            if on_evaluated is not None:
                on_evaluated(llm.n_tokens)
            token = sampler.sample(ctx, -1)

    def _emit(
        self, token: int, out: list[int], params: SamplingParams, on_token: TokenHook | None
    ) -> tuple[str, str | None] | None:
        """Append a chosen (non-EOG) token; the finish reason (and the text cut at a stop
        string) if the output ends with it, else None."""
        out.append(token)
        if on_token is not None:
            on_token(token)
        if params.stop:
            so_far = self.detokenize(out)
            cut = stop_cut(so_far, params.stop)
            if cut >= 0:
                return "stop", so_far[:cut]
        if len(out) >= params.max_tokens:
            return "length", None
        return None

    # -- a draft walked with the request's sampler (verification of a peer's answer) ------
    def follow_draft(
        self,
        prompt: Sequence[int],
        draft: Sequence[int],
        params: SamplingParams,
        on_token: TokenHook | None = None,
        *,
        tail: bool = True,
        chunk: int = 128,
    ) -> DraftOutcome:
        """Speculative-decoding verification of ``draft`` (a claimed output of ``prompt``).

        The prompt is prefilled in generation's own batches; one teacher-forced pass over the
        draft then gives the local logits at every position, and the request's own sampler
        chain (same seed, so the same random draws, and the same penalty and grammar state)
        picks the local token at each position in turn, as generation does. The longest
        prefix where the draft equals the local choices is accepted. At the first divergence
        k the context is cut back to ``prompt + draft[:k]`` (a KV cut, no recomputation), the
        local token at k is taken and, with ``tail``, the rest is generated by the decode loop
        of `continue_generation`. The output ends where the local model ends it (end of
        generation, stop string, ``max_tokens``), wherever the draft says it ends. Every token
        served is the local model's own choice.

        Numerics: llama.cpp computes a row's logits with kernels that depend on the batch's
        shape (a batched pass and one-token decodes differ by up to ~2 logits on a 2-core
        CPU, with or without llamafile's GEMM and weight repacking), so at a near-tie the
        walk may choose otherwise than generation, which decodes one token at a time. The
        prompt is prefilled in generation's own batches, so the first row is generation's;
        after it, the divergence's ``margin`` and ``mass_between`` tell such noise from a
        wrong token (deciding the row again in a one-token decode on the batched pass's KV
        cache does not reproduce generation either: measured, docs/benchmarks.md)."""
        prompt, draft = list(prompt), list(draft)[: params.max_tokens]
        if not prompt:
            raise ValueError("empty prompt")
        self.check_fits(len(prompt), params.max_tokens)
        sampler = self._sampler(params)
        # Greedy with no penalty or grammar: the sampler is a stateless argmax (the first
        # maximum, as numpy's), so whole blocks are decided at once instead of row by row
        # (a llama.cpp sample copies the 262k-entry row first).
        plain_greedy = params.greedy and params.repeat_penalty == 1.0 and not params.grammar
        ctx = self.llm._ctx
        t0 = time.perf_counter()
        n_prompt, n = len(prompt), len(draft)
        toks = prompt + draft
        step = max(1, min(chunk, self.config.n_batch))
        out: list[int] = []
        ended: tuple[str, str | None] | None = None
        local: int | None = None
        divergence: Divergence | None = None
        self.reset()
        ctx.kv_cache_seq_rm(-1, 0, -1)
        self.prefill(prompt)  # generation's own batches: row 0 is the one generation samples
        pos = n_prompt  # the next draft token to evaluate sits at this position
        rows: list[int] = [-1]  # batch indices of the rows to walk (-1: the last logits)
        while True:
            best = self._row_argmax(rows) if plain_greedy else None
            for r, idx in enumerate(rows):
                j = len(out)  # the completion position this row predicts
                c = int(best[r]) if best is not None else int(sampler.sample(ctx, idx))
                claimed = draft[j] if j < n else self.eog_token
                if c == claimed and j < n:
                    ended = self._emit(c, out, params, on_token)
                    if ended is not None:
                        break
                    continue
                if c != claimed and not (j == n and self.is_eog(c)):  # any EOG ends alike
                    divergence = self._divergence(idx, j, claimed, c, params.temperature)
                local = c
                break
            if ended is not None or local is not None or pos >= n_prompt + n:
                break
            end = min(n_prompt + n, pos + step)
            self._decode_rows(toks, pos, end, pos)
            rows = list(range(end - pos))
            pos = end
        t1 = time.perf_counter()
        generation: Generation | None = None
        accepted = len(out)
        if local is not None and ended is None:
            if self.is_eog(local):
                ended = ("stop", None)
            elif tail:
                self._cut_to(toks[: n_prompt + accepted])
                ended = self._decode_loop(sampler, local, out, params, on_token)
        if ended is not None:
            finish, cut_text = ended
            generation = Generation(
                tokens=out,
                text=cut_text if cut_text is not None else self.detokenize(out),
                finish_reason=finish,
                prompt_tokens=len(prompt),
                prefill_ms=(t1 - t0) * 1000,
                decode_ms=(time.perf_counter() - t1) * 1000,
            )
        return DraftOutcome(generation, accepted, divergence, n, (t1 - t0) * 1000)

    def _row_argmax(self, rows: list[int]) -> np.ndarray:
        """The argmax of each logit row (batch indices; -1: the last)."""
        ctx = self.llm._ctx.ctx
        return np.array(
            [
                np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)
                ).argmax()
                for i in rows
            ]
        )

    def _decode_rows(self, toks: list[int], pos: int, end: int, first: int) -> None:
        """Decode ``toks[pos:end]`` (the context holds ``toks[:pos]``) with logits for the
        rows at positions >= ``first``."""
        llm = self.llm
        part = toks[pos:end]
        llm._batch.set_batch(batch=part, n_past=pos, logits_all=True)
        for j in range(min(len(part), first - pos)):  # no logits for earlier prompt tokens
            llm._batch.batch.logits[j] = False
        llm._ctx.decode(llm._batch)
        llm.input_ids[pos:end] = part
        llm.n_tokens = end

    def _divergence(
        self, idx: int, position: int, claimed: int, local: int, temperature: float
    ) -> Divergence:
        """How far apart the claimed and the local token stand in the local row ``idx``."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, idx)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        lc, lt = float(row[local]), float(row[claimed])
        lo, hi = min(lc, lt), max(lc, lt)
        between = (row > lo) & (row < hi)
        mass = 0.0
        if temperature > 0 and between.any():
            # Softmax at the request's temperature: the mass a seeded draw must cross.
            z = (row.astype(np.float64) - row.max()) / temperature
            p = np.exp(z)
            mass = float(p[between].sum() / p.sum())
        return Divergence(
            position, claimed, local, lc - lt, int(np.count_nonzero(between)) + 1, mass
        )

    def _cut_to(self, tokens: list[int]) -> None:
        """Make the context hold exactly ``tokens`` (a prefix of what it holds). A KV cut
        when every layer keeps all its cells (no sliding window, or a full-size one, as
        llama.cpp gives Gemma 3 by default); otherwise the prefix is prefilled again, since
        a windowed cache may have dropped cells the cut would need."""
        info = self.kv_cache_info()
        if info.n_swa == 0 or info.swa_full:
            self.llm._ctx.kv_cache_seq_rm(-1, len(tokens), -1)
            self.resume(tokens)
        else:
            self.clear_memory()
            self.prefill(tokens)

    def _sampler(self, params: SamplingParams) -> Any:  # llama_cpp's LlamaSampler chain
        """llama-cpp-python's sampler chain for ``params``, seeded from ``params.seed``."""
        llm = self.llm
        llm.set_seed(params.seed)
        grammar = None
        if params.grammar:
            grammar = llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False)
        return llm._init_sampler(
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            grammar=grammar,
        )

    # -- teacher-forced scoring (verification and quality gates) --------------------------
    def score(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        top_k: int = 0,
        chunk: int = 64,
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
                top_lps.extend(
                    (np.take_along_axis(part_val, order, axis=1) - lse[:, None]).tolist()
                )

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
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        top_k: int = 0,
        logprob_floor: float | None = None,
        chunk: int = 128,
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
        reducer = CheckReducer(
            completion, self.llm.n_vocab(), top_k=top_k, logprob_floor=logprob_floor
        )
        self._teacher_forced(
            prompt, completion, max(1, min(chunk, self.config.n_batch)), reducer, merged=True
        )
        out = reducer.result()
        out.prompt_tokens = len(prompt)
        out.ms = (time.perf_counter() - t0) * 1000
        return out

    def _teacher_forced(
        self,
        prompt: Sequence[int],
        completion: list[int],
        step: int,
        reduce: Callable[[Any, int], None],
        merged: bool = False,
    ) -> None:
        """Prefill ``prompt + completion[:-1]`` from an empty KV cache, handing each block of
        logit rows (a view of llama.cpp's buffer, valid until the next decode) to
        ``reduce(block, first_completion_position)``. Row j predicts completion[j].

        ``merged=False`` (`score`): the prompt in its own decodes, then ``step`` completion
        tokens per decode. ``merged=True``: one token stream cut into decodes of at most
        n_batch tokens, each ending after ``step`` logit rows (the first rows ride with the
        prompt). The batching changes llama.cpp's float rounding, not what is computed."""
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
                self._decode_rows(toks, pos, end, first)
                if end > first:
                    at = max(pos, first)
                    reduce(
                        np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(end - at, n_vocab)),
                        at - first,
                    )
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
