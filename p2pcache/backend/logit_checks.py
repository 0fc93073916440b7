"""What a verifier needs from blocks of logit rows, computed with as few passes as possible.

Numpy only (no llama.cpp import): `bench/bench_verify_gpu.py` loads this file by path on a GPU
machine and times the same code.

`LlamaBackend.score` gives exact log-probabilities and the top-k of every row: a full
log-sum-exp (subtract, exp, sum over 262k logits for Gemma 3) and an argpartition per row.
Verification (`p2pcache.net.verify`) only asks yes/no questions, which need much less:

- the logit gap ``max - chosen`` and the argmax: one argmax pass (the max is read at the
  argmax) plus two gathers;
- top-k membership: ``#(logits > chosen) < k``, one comparison pass, and only on rows where
  the token is not already the maximum (rank 0);
- ``log p(token) < floor``: since ``max <= lse <= max + ln V``, the log-prob lies in
  ``[-gap - ln V, -gap]``. Only rows where that interval straddles the floor (gaps between
  ~7.5 and 20 for floor -20 with a 262k vocabulary) need the log-sum-exp, and those rows get
  it computed exactly as `LlamaBackend.score` does, so every decision equals the one the
  full scores give.

Ties: ``score``'s top-k came from an argpartition, which breaks exact ties at the k-th place
arbitrarily; the rank test counts a token tied with the k-th best as inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Margin (nats) around the log-prob bounds: float32 rounding of `score`'s log-sum-exp is far
# smaller; rows inside the margin get the exact computation.
_BOUND_EPS = 1e-3


@dataclass
class TokenChecks:
    """Per completion position j (the token predicted from prompt + completion[:j]).

    ``argmax`` and ``gaps`` equal `Score.argmax` / `Score.gaps` bit for bit. ``ranks[j]``:
    how many logits are strictly above the token's (only when asked with top_k > 0, else
    empty). ``below_floor[j]``: log p(token) < the floor asked for (else empty)."""

    tokens: list[int]
    argmax: list[int]
    gaps: list[float]
    ranks: list[int] = field(default_factory=list)
    below_floor: list[bool] = field(default_factory=list)
    exact_rows: int = 0  # rows whose log-prob bounds straddled the floor (full log-sum-exp)
    prompt_tokens: int = 0
    ms: float = 0.0


class CheckReducer:
    """Reduces logit blocks (rows = consecutive completion positions) into `TokenChecks`.

    Call it with each block, in any order, as ``reducer(block, first_position)``; the block may
    be a view of llama.cpp's logits buffer (it is only read, never kept)."""

    def __init__(
        self, tokens: Any, n_vocab: int, top_k: int = 0, logprob_floor: float | None = None
    ) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        n = len(self.tokens)
        self.n_vocab = n_vocab
        self.top_k = top_k
        self.floor = logprob_floor
        self.argmax = np.zeros(n, np.int64)
        self.gaps = np.zeros(n, np.float32)
        self.ranks = np.zeros(n, np.int64)
        self.below = np.zeros(n, bool)
        self.exact_rows = 0
        self._mask: np.ndarray | None = None  # one row of booleans, reused
        self._row: np.ndarray | None = None  # one row of float32, reused
        # Log-prob intervals: decided without the log-sum-exp outside this range of gaps.
        if logprob_floor is not None:
            self._sure_above = (
                -logprob_floor - math.log(n_vocab) - _BOUND_EPS
            )  # gap <= this: lp >= floor
            self._sure_below = -logprob_floor + _BOUND_EPS  # gap > this: lp < floor

    def __call__(self, block: np.ndarray, at: int) -> None:
        k = min(block.shape[0], len(self.tokens) - at)
        if k <= 0:
            return
        block = block[:k]
        rows = np.arange(k)
        am = block.argmax(axis=1)
        mx = block[rows, am]  # == block.max(axis=1), without a second pass
        chosen = block[rows, self.tokens[at : at + k]]
        gaps = mx - chosen
        self.argmax[at : at + k] = am
        self.gaps[at : at + k] = gaps
        if self.top_k > 0:
            # Rows where the token is a maximum have rank 0 (the zeros already there).
            for i in np.flatnonzero(gaps > 0):
                if self._mask is None:
                    self._mask = np.empty(self.n_vocab, bool)
                np.greater(block[i], chosen[i], out=self._mask)
                self.ranks[at + i] = np.count_nonzero(self._mask)
        if self.floor is not None:
            g = gaps.astype(np.float64)
            self.below[at : at + k] = g > self._sure_below
            for i in np.flatnonzero((g > self._sure_above) & (g <= self._sure_below)):
                self.below[at + i] = (
                    self._exact_logprob(block[i : i + 1], mx[i : i + 1], chosen[i : i + 1])
                    < self.floor
                )
                self.exact_rows += 1

    def _exact_logprob(self, row: np.ndarray, mx: np.ndarray, chosen: np.ndarray) -> float:
        """log p(token) for one (1, V) row, computed as `LlamaBackend.score` does."""
        if self._row is None:
            self._row = np.empty((1, self.n_vocab), np.float32)
        tmp = self._row
        np.subtract(row, mx[:, None], out=tmp)
        np.exp(tmp, out=tmp)
        lse = mx + np.log(tmp.sum(axis=1))
        return float((chosen - lse)[0])

    def result(self) -> TokenChecks:
        return TokenChecks(
            tokens=self.tokens.astype(int).tolist(),
            argmax=self.argmax.astype(int).tolist(),
            gaps=self.gaps.astype(float).tolist(),
            ranks=self.ranks.astype(int).tolist() if self.top_k > 0 else [],
            below_floor=self.below.tolist() if self.floor is not None else [],
            exact_rows=self.exact_rows,
        )
