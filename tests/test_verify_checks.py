"""Verification's cheap per-token checks (`LlamaBackend.check`) give exactly the decisions of
the full log-softmax scores (`LlamaBackend.score`) they replaced, on the real model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pcache.backend import LlamaBackend, Score
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.verify import VerifyConfig, verify_decoder_final
from p2pcache.store import Entry, Output

pytestmark = pytest.mark.model

MH = "a" * 64
PROMPT = "Write a long, detailed essay about the history of the printing press in Europe."


def old_rules(
    s: Score, tokens: Sequence[int], params: SamplingParams, config: VerifyConfig
) -> tuple[bool, int]:
    """The token rules of `verify_decoder_final` before `check` existed, on `score`'s output
    (as they read then; a "length" ending, so no end-of-generation row)."""
    strict = params.greedy and params.repeat_penalty == 1.0 and not params.grammar
    top_k = 0 if strict else params.top_k
    tol = config.greedy_logit_tol
    for j in range(len(tokens)):
        if strict:
            if s.argmax[j] != tokens[j] and s.gaps[j] > tol:
                return False, j
        else:
            if top_k > 0 and s.top_ids and tokens[j] not in s.top_ids[j]:
                return False, j
            if params.min_p > 0 and s.gaps[j] > -math.log(params.min_p) + tol:
                return False, j
            if s.logprobs[j] < config.logprob_floor:
                return False, j
    return True, -1


def new_rules(
    backend: LlamaBackend,
    prompt: list[int],
    tokens: list[int],
    params: SamplingParams,
    config: VerifyConfig,
    producer: Identity,
) -> tuple[bool, int]:
    """`verify_decoder_final` itself, on a signed entry carrying ``tokens``."""
    params = SamplingParams.from_dict({**params.to_dict(), "max_tokens": len(tokens)})
    key = input_sha256(MH, prompt, params)
    entry = Entry(
        input_sha256=key,
        model_hash=MH,
        cache_level="decoder_final",
        output=Output(tokens, backend.detokenize(tokens), "length"),
        params=params.to_dict(),
        privacy_flag=False,
        producer=producer.peer_id,
        verified_by_us=False,
        prompt_tokens=len(prompt),
    )
    entry.signature = producer.sign(entry.signing_payload())
    v = verify_decoder_final(backend, entry, key, MH, prompt, params, config)
    assert v.reason != "text does not match the tokens", v  # the model part must have run
    return v.ok, v.position


def logit_rows(
    backend: LlamaBackend, prompt: list[int], completion: list[int], merged: bool, step: int
) -> np.ndarray:
    """The prefill's logit rows, batched as `check` (merged) or `score` does."""
    rows = np.zeros((len(completion), backend.llm.n_vocab()), np.float32)

    def keep(block: Any, at: int) -> None:
        k = min(block.shape[0], len(completion) - at)
        rows[at : at + k] = block[:k]

    backend._teacher_forced(prompt, completion, step, keep, merged=merged)
    return rows


def test_score_and_check_equal_the_reference_formulas_on_the_same_logits(
    backend: LlamaBackend,
) -> None:
    """`score` (the L1 gate's log-probs) is the plain log-softmax of the prefill's logits, bit
    for bit; `check` gives the same argmax and gaps and exact rank / floor answers."""
    prompt = backend.chat_tokens([{"role": "user", "content": PROMPT}])
    gen = backend.generate(
        prompt,
        SamplingParams(max_tokens=150, temperature=0.9, seed=3, top_k=0, min_p=0.0, top_p=1.0),
    )
    toks = list(gen.tokens)
    toks[10] = 1000 + toks[10] % 5000  # an unlikely token: a row far from the argmax
    # `score` as the L1 gate calls it: the plain log-softmax of its own batches' logits.
    rows = logit_rows(backend, prompt, toks, merged=False, step=64)
    r = np.arange(len(toks))
    mx = rows.max(axis=1)
    chosen = rows[r, toks]
    lse = mx + np.log(np.exp(rows - mx[:, None]).sum(axis=1))
    s = backend.score(prompt, toks)
    assert s.logprobs == (chosen - lse).astype(float).tolist()
    assert (
        s.argmax == rows.argmax(axis=1).tolist() and s.gaps == (mx - chosen).astype(float).tolist()
    )

    # `check` against `score` on the same logits (both batched as `check` does).
    rows = logit_rows(backend, prompt, toks, merged=True, step=128)
    mx = rows.max(axis=1)
    chosen = rows[r, toks]
    lse = mx + np.log(np.exp(rows - mx[:, None]).sum(axis=1))
    ref_lp = (chosen - lse).astype(float)

    s = backend.score(prompt, toks, top_k=5, chunk=128, merged=True)
    assert s.logprobs == ref_lp.tolist()
    assert (
        s.argmax == rows.argmax(axis=1).tolist() and s.gaps == (mx - chosen).astype(float).tolist()
    )

    ranks = (rows > chosen[:, None]).sum(axis=1)
    assert ranks[10] > 100
    c = backend.check(prompt, toks, top_k=5, logprob_floor=-20.0)
    assert c.argmax == s.argmax and c.gaps == s.gaps
    assert c.ranks == ranks.tolist()
    assert [rk < 5 for rk in c.ranks] == [t in ids for t, ids in zip(toks, s.top_ids, strict=False)]
    # Floors at, just above and just below real log-probs exercise the exact rows; far floors
    # are decided from the bounds alone.
    floors = [-20.0, -3.0, -1.0] + [lp for lp in ref_lp[[10, 20, 30]]]
    floors += [float(np.nextafter(np.float32(f), np.float32(0))) for f in floors[-3:]]
    for floor in floors:
        c = backend.check(prompt, toks, logprob_floor=floor)
        assert c.below_floor == [lp < floor for lp in ref_lp], floor
    assert backend.check(prompt, toks, logprob_floor=float(ref_lp[10])).exact_rows >= 1


def test_verification_decisions_equal_the_full_scores_rules(
    backend: LlamaBackend, tmp_path: Path
) -> None:
    """Honest and altered answers, greedy and sampled, with tolerances and floors around the
    answers' own gaps and log-probs: accept/reject and the failing position are unchanged."""
    producer = Identity.load_or_create(tmp_path / "producer.key")
    prompt = backend.chat_tokens([{"role": "user", "content": PROMPT}])
    n = 140  # more than one decode's worth of rows (128)
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    sampled = SamplingParams(max_tokens=n, temperature=0.8, seed=7)  # top-k 40, min_p 0.05
    loose = SamplingParams(max_tokens=n, temperature=1.0, seed=9, top_k=0, min_p=0.0, top_p=1.0)
    # (position, rank of the substitute among the local model's choices; -1: an arbitrary token)
    edits = {
        "greedy": [(5, 1), (130, 1), (30, 2), (20, -1)],
        "sampled": [(5, 39), (5, 40), (130, 1), (20, -1)],  # the 40th best is in top-k 40
        "loose": [(5, 1), (135, -1)],
    }
    cases: list[tuple[str, SamplingParams, list[int]]] = []
    for name, params in (("greedy", greedy), ("sampled", sampled), ("loose", loose)):
        honest = backend.generate(prompt, params).tokens
        assert len(honest) == n  # the cases below rely on a "length" ending
        s = backend.score(prompt, honest, top_k=41, chunk=128, merged=True)
        cases.append((f"{name} honest", params, honest))
        for j, rank in edits[name]:
            alt = list(honest)
            alt[j] = s.top_ids[j][rank] if rank >= 0 else 2000 + 37 * j
            if not backend.is_eog(alt[j]):
                cases.append((f"{name} pos {j} rank {rank}", params, alt))
        if name == "loose":  # a token whose log-prob is next to the default floor (-20)
            row = logit_rows(backend, prompt, honest, merged=True, step=128)[10].astype(np.float64)
            lp = row - row.max() - np.log(np.exp(row - row.max()).sum())
            alt = list(honest)
            alt[10] = int(np.argmin(np.abs(lp - VerifyConfig().logprob_floor)))
            cases.append(("loose pos 10 near the floor", params, alt))
    seen_reject = seen_accept = 0
    for name, params, toks in cases:
        full = backend.score(
            prompt, toks, top_k=0 if params.greedy else params.top_k, chunk=128, merged=True
        )
        lps = sorted(full.logprobs)
        gaps = sorted(full.gaps)
        # The default; a strict one; one sitting exactly on the answer's worst gap / log-prob.
        configs = [
            VerifyConfig(),
            VerifyConfig(greedy_logit_tol=0.0, logprob_floor=-5.0),
            VerifyConfig(greedy_logit_tol=gaps[-1], logprob_floor=lps[0]),
        ]
        for config in configs:
            old = old_rules(full, toks, params, config)
            assert new_rules(backend, prompt, toks, params, config, producer) == old, (name, config)
            seen_accept += old[0]
            seen_reject += not old[0]
    assert seen_accept >= 8 and seen_reject >= 8  # both outcomes covered


def test_check_handles_a_prompt_longer_than_one_batch(backend: LlamaBackend) -> None:
    """A prompt beyond n_batch takes several decodes before the first logit row."""
    prompt = backend.tokenize(" ".join(f"item {i}," for i in range(300)))
    assert len(prompt) > backend.config.n_batch
    toks = backend.generate(prompt, SamplingParams(max_tokens=20)).tokens
    c = backend.check(prompt, toks, top_k=3, logprob_floor=-20.0)
    s = backend.score(prompt, toks, top_k=3, chunk=128, merged=True)
    assert c.argmax == s.argmax and c.gaps == s.gaps and len(c.gaps) == len(toks)
    assert [r < 3 for r in c.ranks] == [t in ids for t, ids in zip(toks, s.top_ids, strict=False)]
    assert c.below_floor == [lp < -20.0 for lp in s.logprobs]
    assert (
        sum(a == t for a, t in zip(c.argmax, toks, strict=False)) >= len(toks) - 2
    )  # the greedy output itself
