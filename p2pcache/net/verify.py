"""Verification of a fetched `decoder_final` by one teacher-forced prefill on the local model.

`LlamaBackend.check(prompt, completion, top_k, logprob_floor)` runs it and returns, per
completion token, the local argmax, the logit gap to it and, when asked, its rank and whether its
log-prob is under the floor (on the same logits, the same decisions as `LlamaBackend.score`'s
full log-softmax and top-k, at a fraction of the cost: `p2pcache.backend.logit_checks`). The rules:

- greedy (temperature 0, repeat_penalty 1, no grammar): every token is the local argmax or
  within `VerifyConfig.greedy_logit_tol` of it;
- sampled (or a penalty/grammar that reshapes logits): every token is in the local top-k
  (when top_k > 0), within ``-ln(min_p)`` (+ tolerance) of the best logit (when min_p > 0),
  and above a log-prob floor;
- the ending: ``finish_reason == "length"`` needs exactly ``max_tokens`` tokens; a plain
  ``"stop"`` needs the local model to end there (the best next token is end-of-generation,
  within the tolerance), checked by scoring one extra end-of-generation token; a stop string
  needs the text to be the detokenized output cut at its first stop string;
- the text equals the detokenized tokens, the key recomputes from (model, prompt, params), and
  the producer's signature over the entry is valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from p2pcache.backend import BackendWorker, stop_cut
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.config import VerifyConfig
from p2pcache.net.peer_keys import verify_by_peer
from p2pcache.store import Entry


class ChecksLike(Protocol):
    argmax: list[int]
    gaps: list[float]
    ranks: list[int]  # logits strictly above the token's (asked with top_k > 0)
    below_floor: list[bool]  # log p(token) < the floor (asked with a floor)


class Scorer(Protocol):
    """What verification needs from the local model (`LlamaBackend` is one)."""

    def check(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        top_k: int = 0,
        logprob_floor: float | None = None,
    ) -> ChecksLike: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def is_eog(self, token: int) -> bool: ...

    @property
    def eog_token(self) -> int: ...


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    position: int = -1  # first failing completion position, -1 if none or not positional
    ms: float = 0.0


def check_static(
    entry: Entry, key: str, model_hash: str, prompt: Sequence[int], params: SamplingParams
) -> Verdict:
    """Everything that needs no model: key, model, params, producer signature."""
    if entry.cache_level != "decoder_final":
        return Verdict(False, "not a decoder_final")
    if entry.model_hash != model_hash:
        return Verdict(False, "entry of another model")
    if entry.input_sha256 != key or input_sha256(model_hash, prompt, params) != key:
        return Verdict(False, "key does not match prompt and params")
    try:
        if SamplingParams.from_dict(entry.params) != params:
            return Verdict(False, "entry params differ from the request")
    except (TypeError, ValueError):
        return Verdict(False, "entry params malformed")
    if not verify_by_peer(entry.producer, entry.signature, entry.signing_payload()):
        return Verdict(False, "bad producer signature")
    if len(entry.output.tokens) > params.max_tokens:
        return Verdict(False, "more tokens than max_tokens")
    return Verdict(True, "static checks passed")


def verify_decoder_final(
    scorer: Scorer,
    entry: Entry,
    key: str,
    model_hash: str,
    prompt: Sequence[int],
    params: SamplingParams,
    config: VerifyConfig | None = None,
) -> Verdict:
    """Blocking (runs the model): call it on the backend worker thread."""
    config = config or VerifyConfig()
    t0 = time.perf_counter()
    v = check_static(entry, key, model_hash, prompt, params)
    if not v.ok:
        return v
    out = entry.output
    tokens = list(out.tokens)
    if not tokens and out.finish_reason != "stop":
        return Verdict(False, "empty output must end with stop")
    # Text: the detokenized tokens, or their cut at the first stop string.
    full = scorer.detokenize(tokens)
    cut = stop_cut(full, params.stop)
    stop_string_end = cut >= 0
    if stop_string_end:
        if out.text != full[:cut] or out.finish_reason != "stop":
            return Verdict(False, "text is not the output cut at its stop string")
        if stop_cut(scorer.detokenize(tokens[:-1]), params.stop) >= 0:
            return Verdict(False, "output continues past a stop string")
    elif out.text != full:
        return Verdict(False, "text does not match the tokens")
    if out.finish_reason == "length" and len(tokens) != params.max_tokens:
        return Verdict(False, "finish_reason length with fewer than max_tokens tokens")
    if out.finish_reason not in ("stop", "length"):
        return Verdict(False, "unknown finish_reason")
    if any(scorer.is_eog(t) for t in tokens):
        return Verdict(False, "end-of-generation token inside the output")
    plain_stop = out.finish_reason == "stop" and not stop_string_end
    strict = params.greedy and params.repeat_penalty == 1.0 and not params.grammar
    top_k = 0 if strict else params.top_k
    scored = tokens + ([scorer.eog_token] if plain_stop else [])
    # Greedy needs only gaps and argmax; sampled asks for ranks and the floor test too.
    s = scorer.check(
        prompt, scored, top_k=top_k, logprob_floor=None if strict else config.logprob_floor
    )
    n = len(tokens)
    tol = config.greedy_logit_tol
    for j in range(n):
        if strict:
            if s.argmax[j] != tokens[j] and s.gaps[j] > tol:
                return _fail(f"token {j} is not the local argmax (gap {s.gaps[j]:.3f})", j, t0)
        else:
            if top_k > 0 and s.ranks[j] >= top_k:
                return _fail(
                    f"token {j} is outside the local top-{top_k} (rank {s.ranks[j] + 1})", j, t0
                )
            if params.min_p > 0 and s.gaps[j] > -math.log(params.min_p) + tol:
                return _fail(f"token {j} is below min_p (gap {s.gaps[j]:.3f})", j, t0)
            if s.below_floor[j]:
                return _fail(f"token {j} log-prob under the floor {config.logprob_floor:g}", j, t0)
    if plain_stop:
        # The model must end here: its best next token is end-of-generation (any EOG id).
        if not scorer.is_eog(s.argmax[n]) and s.gaps[n] > (
            tol if strict else -math.log(max(params.min_p, 1e-9))
        ):
            return _fail("the local model does not end the output there", n, t0)
    return Verdict(True, "verified", -1, (time.perf_counter() - t0) * 1000)


def _fail(reason: str, pos: int, t0: float) -> Verdict:
    return Verdict(False, reason, pos, (time.perf_counter() - t0) * 1000)


class ModelVerifier:
    """`verify_decoder_final` on the node's own model, run on its worker thread."""

    def __init__(
        self, worker: BackendWorker, model_hash: str, config: VerifyConfig | None = None
    ) -> None:
        self.worker = worker
        self.model_hash = model_hash
        self.config = config or VerifyConfig()

    async def verify(
        self, entry: Entry, key: str, prompt: Sequence[int], params: SamplingParams
    ) -> Verdict:
        backend = self.worker.backend
        return await self.worker.run(
            lambda: verify_decoder_final(
                backend, entry, key, self.model_hash, list(prompt), params, self.config
            )
        )
