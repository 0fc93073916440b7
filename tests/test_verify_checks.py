"""The cheap per-token checks of a teacher-forced pass (`LlamaBackend.check`, the tolerance
check verification used before drafts; the benches time it) give exactly the decisions of the
full log-softmax scores (`LlamaBackend.score`, the L1 gate's), on the real model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pcache.backend import LlamaBackend
from p2pcache.keys import SamplingParams

pytestmark = pytest.mark.model

MH = "a" * 64
PROMPT = "Write a long, detailed essay about the history of the printing press in Europe."


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
