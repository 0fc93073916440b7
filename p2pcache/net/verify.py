"""A fetched `decoder_final` is a draft: serve exactly what the local model would say.

Verification works the way speculative decoding treats a draft model's tokens
(`LlamaBackend.follow_draft`): one teacher-forced pass over prompt + claimed output gives the
local logits at every position, and the request's own sampler chain (greedy, or the seeded
sampler with the request's seed, penalties and grammar) picks the local token at each position
in turn. The longest prefix where the claimed tokens equal the local choices is accepted; at
the first divergence the local token is taken and the rest is generated here. What the client
gets is the local model's own choice at every position: there is no tolerance a liar could
use to steer it.

Before the model runs, the static checks (no model) refuse an entry that is malformed or
inconsistent: wrong level, model, key or params, a bad producer signature, more tokens than
``max_tokens``, text that is not the detokenized tokens (or their cut at a stop string), a
``length`` ending without ``max_tokens`` tokens, an end-of-generation token inside the output.

Blame: a divergence is a lie unless float noise explains it. llama.cpp's kernels differ
between batch shapes and between hardware, so at a near-tie an honest answer may differ from
this node's choice. A divergence is a near-tie when the local margin between the local choice
and the claimed token is within `VerifyConfig.near_tie_margin` (greedy), or when the two
tokens are neighbours in the local sampling order, up to `VerifyConfig.near_tie_mass` of
probability between them (noise shifts a seeded draw's cumulative distribution a little:
it can cross a boundary, not a block of probable tokens). Near-ties are not evidence; the
reputation counts them, and a peer that has more of them than honest noise explains is
penalised. Anything else is a lie: published as signed evidence that receivers re-check with
this same function.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from p2pcache.backend import BackendWorker, Divergence, DraftOutcome, stop_cut
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.config import VerifyConfig
from p2pcache.net.peer_keys import verify_by_peer
from p2pcache.store import Entry

Kind = Literal["match", "near_tie", "lie", "malformed"]


class DraftModel(Protocol):
    """What verification needs from the local model (`LlamaBackend` is one)."""

    def follow_draft(
        self,
        prompt: Sequence[int],
        draft: Sequence[int],
        params: SamplingParams,
        on_token: None = None,
        *,
        tail: bool = True,
    ) -> DraftOutcome: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def is_eog(self, token: int) -> bool: ...


@dataclass(frozen=True)
class Verdict:
    """``kind``: match (the entry is exactly the local answer), near_tie (it diverged within
    float noise: not blamed, counted), lie (diverged outside the noise, or inconsistent:
    blamed, with evidence) or malformed (refused before the model ran: blamed).
    ``outcome``: the walk, with the local answer when a tail was asked for."""

    kind: Kind
    reason: str
    position: int = -1  # first diverging completion position, -1 if none
    ms: float = 0.0
    outcome: DraftOutcome | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "match"

    @property
    def blamed(self) -> bool:
        return self.kind in ("lie", "malformed")


def check_static(
    model: DraftModel,
    entry: Entry,
    key: str,
    model_hash: str,
    prompt: Sequence[int],
    params: SamplingParams,
) -> str | None:
    """Why the entry is refused without running the model, or None."""
    if entry.cache_level != "decoder_final":
        return "not a decoder_final"
    if entry.model_hash != model_hash:
        return "entry of another model"
    if entry.input_sha256 != key or input_sha256(model_hash, prompt, params) != key:
        return "key does not match prompt and params"
    try:
        if SamplingParams.from_dict(entry.params) != params:
            return "entry params differ from the request"
    except (TypeError, ValueError):
        return "entry params malformed"
    if not verify_by_peer(entry.producer, entry.signature, entry.signing_payload()):
        return "bad producer signature"
    out = entry.output
    tokens = list(out.tokens)
    if len(tokens) > params.max_tokens:
        return "more tokens than max_tokens"
    if out.finish_reason not in ("stop", "length"):
        return "unknown finish_reason"
    if not tokens and out.finish_reason != "stop":
        return "empty output must end with stop"
    if out.finish_reason == "length" and len(tokens) != params.max_tokens:
        return "finish_reason length with fewer than max_tokens tokens"
    if any(model.is_eog(t) for t in tokens):
        return "end-of-generation token inside the output"
    full = model.detokenize(tokens)
    cut = stop_cut(full, params.stop)
    if cut >= 0:
        if out.text != full[:cut] or out.finish_reason != "stop":
            return "text is not the output cut at its stop string"
        if stop_cut(model.detokenize(tokens[:-1]), params.stop) >= 0:
            return "output continues past a stop string"
    elif out.text != full:
        return "text does not match the tokens"
    return None


def near_tie(div: Divergence, params: SamplingParams, config: VerifyConfig) -> bool:
    """Could float noise explain this divergence? Greedy: the claimed token's logit is within
    ``near_tie_margin`` of the local choice's. Sampled: the seeded draw would pick the claimed
    token if the cumulative distribution moved by at most ``near_tie_mass``: the tokens
    between the two (in logit order) hold no more than that probability."""
    if params.greedy:
        return div.margin <= config.near_tie_margin
    return div.mass_between <= config.near_tie_mass


def verify_draft(
    model: DraftModel,
    entry: Entry,
    key: str,
    model_hash: str,
    prompt: Sequence[int],
    params: SamplingParams,
    config: VerifyConfig | None = None,
    *,
    tail: bool = True,
) -> Verdict:
    """Blocking (runs the model): call it on the backend worker thread. ``tail``: after a
    divergence, generate the rest here (the answer a client gets); False only judges."""
    config = config or VerifyConfig()
    t0 = time.perf_counter()
    reason = check_static(model, entry, key, model_hash, prompt, params)
    if reason is not None:
        return Verdict("malformed", reason, ms=(time.perf_counter() - t0) * 1000)
    outcome = model.follow_draft(prompt, list(entry.output.tokens), params, tail=tail)
    ms = (time.perf_counter() - t0) * 1000
    div = outcome.divergence
    if div is None:
        if outcome.matches:
            return Verdict("match", "every token is the local choice", -1, ms, outcome)
        # The local model ended before the draft did (static checks make this rare).
        return Verdict(
            "lie",
            f"the local output ends at token {outcome.accepted}",
            outcome.accepted,
            ms,
            outcome,
        )
    what = (
        f"token {div.position}: claimed {div.claimed}, local {div.local} "
        f"(margin {div.margin:.3f}, {div.rank_gap} apart, {div.mass_between:.3f} between)"
    )
    kind: Kind = "near_tie" if near_tie(div, params, config) else "lie"
    return Verdict(kind, what, div.position, ms, outcome)


class ModelVerifier:
    """`verify_draft` on the node's own model, run on its worker thread."""

    def __init__(
        self, worker: BackendWorker, model_hash: str, config: VerifyConfig | None = None
    ) -> None:
        self.worker = worker
        self.model_hash = model_hash
        self.config = config or VerifyConfig()

    async def verify(
        self,
        entry: Entry,
        key: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        tail: bool = True,
    ) -> Verdict:
        backend = self.worker.backend
        return await self.worker.run(
            lambda: verify_draft(
                backend,
                entry,
                key,
                self.model_hash,
                list(prompt),
                params,
                self.config,
                tail=tail,
            )
        )
