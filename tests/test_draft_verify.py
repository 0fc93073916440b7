"""A peer's answer walked as a draft (`LlamaBackend.follow_draft`, `p2pcache.net.verify`) on
the real model: what the client gets is always the local model's own answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2pcache.backend import LlamaBackend
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.config import VerifyConfig
from p2pcache.net.verify import verify_draft
from p2pcache.store import Entry, Output

pytestmark = pytest.mark.model

MH = "a" * 64
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "List three facts about owls.",
]
PARAMS = [
    SamplingParams(max_tokens=40),
    SamplingParams(max_tokens=40, temperature=0.8, seed=11),
    SamplingParams(max_tokens=40, temperature=1.1, seed=5, top_k=0, top_p=0.9, min_p=0.0),
    SamplingParams(max_tokens=40, temperature=0.7, seed=3, repeat_penalty=1.3),
    SamplingParams(max_tokens=40, stop=(".", " and")),
]


def chat(backend: LlamaBackend, text: str) -> list[int]:
    return backend.chat_tokens([{"role": "user", "content": text}])


def signed(
    backend: LlamaBackend,
    producer: Identity,
    prompt: list[int],
    params: SamplingParams,
    tokens: list[int],
    finish: str,
    text: str | None = None,
) -> tuple[Entry, str]:
    key = input_sha256(MH, prompt, params)
    entry = Entry(
        input_sha256=key,
        model_hash=MH,
        cache_level="decoder_final",
        output=Output(tokens, backend.detokenize(tokens) if text is None else text, finish),
        params=params.to_dict(),
        privacy_flag=False,
        producer=producer.peer_id,
        verified_by_us=False,
        prompt_tokens=len(prompt),
    )
    entry.signature = producer.sign(entry.signing_payload())
    return entry, key


def near_ties(
    backend: LlamaBackend, prompt: list[int], tokens: list[int]
) -> list[tuple[float, int, int]]:
    """(margin, position, runner-up) of each position, closest first (the walk's own rows)."""
    s = backend.score(prompt, tokens, top_k=2, chunk=128, merged=True)
    out = []
    for j, (ids, lps) in enumerate(zip(s.top_ids, s.top_logprobs, strict=True)):
        if ids[0] == tokens[j] and not backend.is_eog(ids[1]):
            out.append((lps[0] - lps[1], j, ids[1]))
    return sorted(out)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled", "top-p", "penalty", "stops"])
def test_an_honest_answer_is_accepted_whole_and_equals_local_generation(
    backend: LlamaBackend, params: SamplingParams
) -> None:
    """The local model's own answer (computed one token at a time, as L3 does) walked as a
    draft: every token accepted, the same tokens, text and ending, nothing generated."""
    for text in PROMPTS:
        prompt = chat(backend, text)
        gen = backend.generate(prompt, params)
        out = backend.follow_draft(prompt, gen.tokens, params)
        assert out.divergence is None and out.matches, (text, out.divergence)
        assert out.generation is not None and out.local_tokens == 0
        assert (out.generation.tokens, out.generation.text, out.generation.finish_reason) == (
            gen.tokens,
            gen.text,
            gen.finish_reason,
        )


@pytest.mark.parametrize("params", PARAMS[:2], ids=["greedy", "sampled"])
def test_a_draft_diverging_anywhere_gives_exactly_the_local_answer(
    backend: LlamaBackend, params: SamplingParams
) -> None:
    """Altered at the first token, in the middle, at the last one, truncated, or run past the
    end: the walk keeps the accepted prefix and the answer is the local model's, byte for byte."""
    prompt = chat(backend, PROMPTS[0])
    gen = backend.generate(prompt, params)
    n = len(gen.tokens)
    assert n == params.max_tokens
    drafts = {}
    for at in (0, n // 2, n - 1):
        d = list(gen.tokens)
        d[at] = (d[at] + 1) % backend.n_vocab
        drafts[at] = d
    drafts[n - 5] = gen.tokens[: n - 5]  # claims to end early: diverges where it ends
    for at, draft in drafts.items():
        out = backend.follow_draft(prompt, draft, params)
        assert out.accepted == at and out.divergence is not None
        assert out.divergence.position == at and out.divergence.local == gen.tokens[at]
        assert out.generation is not None and out.generation.tokens == gen.tokens
        assert out.generation.text == gen.text and out.local_tokens == n - at
    # Without a tail (what evidence checks use) the walk stops at the divergence.
    out = backend.follow_draft(prompt, drafts[n // 2], params, tail=False)
    assert out.generation is None and out.accepted == n // 2


def test_a_near_tie_swap_never_reaches_the_client_and_is_judged_by_its_margin(
    backend: LlamaBackend, tmp_path: Path
) -> None:
    """A liar's favourite: the honest greedy answer with one token swapped for the local
    runner-up where the two nearly tie. The client gets the local answer; within the noise
    margin it is a near-tie (not blamed), outside it a lie."""
    producer = Identity.load_or_create(tmp_path / "p.key")
    params = SamplingParams(max_tokens=40)
    prompt = chat(backend, PROMPTS[1])
    gen = backend.generate(prompt, params)
    margin, at, runner_up = near_ties(backend, prompt, gen.tokens)[0]
    swapped = list(gen.tokens)
    swapped[at] = runner_up
    entry, key = signed(backend, producer, prompt, params, swapped, gen.finish_reason)
    v = verify_draft(backend, entry, key, MH, prompt, params, VerifyConfig(near_tie_margin=margin))
    assert v.kind == "near_tie" and v.position == at and not v.blamed, v.reason
    assert v.outcome is not None and v.outcome.generation is not None
    assert v.outcome.generation.tokens == gen.tokens and v.outcome.accepted == at
    strict = VerifyConfig(near_tie_margin=margin / 2)
    v = verify_draft(backend, entry, key, MH, prompt, params, strict)
    assert v.kind == "lie" and v.blamed and v.position == at
    # The honest answer itself is a match whatever the margin.
    honest, key = signed(backend, producer, prompt, params, gen.tokens, gen.finish_reason)
    assert verify_draft(backend, honest, key, MH, prompt, params, strict).kind == "match"


def test_other_top_k_tokens_in_a_sampled_answer_are_lies(
    backend: LlamaBackend, tmp_path: Path
) -> None:
    """A sampled answer steered token by token through the local top-k: the first steered
    token is caught (far from the seeded draw), the client gets the local answer."""
    producer = Identity.load_or_create(tmp_path / "p.key")
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=21)
    prompt = chat(backend, PROMPTS[2])
    gen = backend.generate(prompt, params)
    s = backend.score(prompt, gen.tokens, top_k=40, chunk=128, merged=True)
    steered = list(gen.tokens)
    first = None
    for j in range(3, len(steered), 4):  # every 4th token: the 5th best one there
        alt = s.top_ids[j][4]
        if alt != steered[j] and not backend.is_eog(alt):
            steered[j] = alt
            first = j if first is None else first
    assert first is not None
    entry, key = signed(backend, producer, prompt, params, steered, "length")
    v = verify_draft(backend, entry, key, MH, prompt, params)
    assert v.kind == "lie" and v.position == first, v.reason
    assert v.outcome is not None and v.outcome.generation is not None
    assert v.outcome.generation.tokens == gen.tokens


def test_static_refusals_run_no_model(backend: LlamaBackend, tmp_path: Path) -> None:
    producer = Identity.load_or_create(tmp_path / "p.key")
    params = SamplingParams(max_tokens=12)
    prompt = chat(backend, PROMPTS[0])
    gen = backend.generate(prompt, params)
    cases = {
        "text does not match the tokens": signed(
            backend, producer, prompt, params, gen.tokens, gen.finish_reason, "forged text"
        ),
        "finish_reason length with fewer than max_tokens tokens": signed(
            backend, producer, prompt, params, gen.tokens[:5], "length"
        ),
        "end-of-generation token inside the output": signed(
            backend, producer, prompt, params, [*gen.tokens[:3], backend.eog_token], "stop"
        ),
    }
    for reason, (entry, key) in cases.items():
        v = verify_draft(backend, entry, key, MH, prompt, params)
        assert v.kind == "malformed" and v.reason == reason and v.outcome is None
    entry, key = signed(backend, producer, prompt, params, gen.tokens, gen.finish_reason)
    entry.signature = bytes(64)
    assert verify_draft(backend, entry, key, MH, prompt, params).reason == "bad producer signature"


def test_the_draft_walk_reads_the_same_rows_as_the_teacher_forced_check(
    backend: LlamaBackend,
) -> None:
    """The walk's greedy choices are the argmax of the rows `check` reads (one pass)."""
    params = SamplingParams(max_tokens=30)
    prompt = chat(backend, PROMPTS[2])
    gen = backend.generate(prompt, params)
    c = backend.check(prompt, gen.tokens)
    assert c.argmax == gen.tokens
    assert np.allclose(c.gaps, 0.0)
