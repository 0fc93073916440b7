"""A peer's answer walked as a draft (`LlamaBackend.follow_draft`, `p2pcache.net.verify`) on
the real model: what the client gets is always the local model's own answer."""

from __future__ import annotations

from pathlib import Path

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


def walk_rows(
    backend: LlamaBackend, prompt: list[int], tokens: list[int]
) -> list[tuple[float, int, int]]:
    """(margin to the runner-up, position, runner-up) where the walk's own rows (the prompt
    in generation's batches, then 128-row blocks: `score` unmerged) agree with ``tokens``,
    up to the first position where they do not; closest first."""
    s = backend.score(prompt, tokens, top_k=2, chunk=128, merged=False)
    out = []
    for j, (ids, lps) in enumerate(zip(s.top_ids, s.top_logprobs, strict=True)):
        if ids[0] != tokens[j]:
            break
        if not backend.is_eog(ids[1]):
            out.append((lps[0] - lps[1], j, ids[1]))
    return sorted(out)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled", "penalty", "stops"])
def test_an_honest_answer_is_never_blamed_and_what_is_accepted_is_its_own(
    backend: LlamaBackend, tmp_path: Path, params: SamplingParams
) -> None:
    """The local model's own answer (computed one token at a time, as L3 does) walked as a
    draft: accepted whole (then byte-identical), or diverging at a near-tie of batch-shape
    noise: never blamed, and the accepted prefix is the answer's."""
    producer = Identity.load_or_create(tmp_path / "p.key")
    whole = 0
    for text in PROMPTS:
        prompt = chat(backend, text)
        gen = backend.generate(prompt, params)
        entry, key = signed(
            backend, producer, prompt, params, gen.tokens, gen.finish_reason, gen.text
        )
        v = verify_draft(backend, entry, key, MH, prompt, params)
        assert v.kind in ("match", "near_tie"), (text, v.reason)
        out = v.outcome
        assert out is not None and out.generation is not None
        assert out.generation.tokens[: out.accepted] == gen.tokens[: out.accepted]
        if v.kind == "match":
            whole += 1
            assert out.local_tokens == 0 and out.accepted == len(gen.tokens)
            assert (out.generation.tokens, out.generation.text, out.generation.finish_reason) == (
                gen.tokens,
                gen.text,
                gen.finish_reason,
            )
        else:
            assert out.divergence is not None and out.divergence.position == out.accepted
    if params.greedy:
        assert whole >= 1


@pytest.mark.parametrize("params", PARAMS[:2], ids=["greedy", "sampled"])
def test_a_draft_diverging_anywhere_gives_the_local_answer(
    backend: LlamaBackend, params: SamplingParams
) -> None:
    """Altered at the first token, in the middle, at the last one, or truncated: the walk
    keeps what it accepted and finishes with the local model. Altered at the first token,
    the answer is generation's own, byte for byte (the prompt is prefilled in generation's
    batches, and nothing of the draft is kept)."""
    prompt = chat(backend, PROMPTS[0])
    gen = backend.generate(prompt, params)
    n = len(gen.tokens)
    assert n == params.max_tokens
    drafts = {}
    for at in (0, n // 2, n - 1):
        d = list(gen.tokens)
        d[at] = (d[at] + 1) % backend.n_vocab
        drafts[at] = d
    drafts[n - 5] = gen.tokens[: n - 5]  # claims to end early
    for at, draft in drafts.items():
        out = backend.follow_draft(prompt, draft, params)
        assert out.accepted <= at and out.divergence is not None
        assert out.divergence.position == out.accepted
        assert out.generation is not None and len(out.generation.tokens) == n
        assert out.generation.tokens[: out.accepted] == gen.tokens[: out.accepted]
        assert out.local_tokens == n - out.accepted
        if out.accepted == at and at < n - 5:  # reached the altered token: an outright lie
            assert out.divergence.claimed == draft[at]
    first = backend.follow_draft(prompt, drafts[0], params)
    assert first.generation is not None and first.generation.tokens == gen.tokens
    assert first.generation.text == gen.text
    # Without a tail (what evidence checks use) the walk stops at the divergence.
    out = backend.follow_draft(prompt, drafts[n // 2], params, tail=False)
    assert out.generation is None and out.accepted <= n // 2


def test_a_near_tie_swap_never_reaches_the_client_and_is_judged_by_its_margin(
    backend: LlamaBackend, tmp_path: Path
) -> None:
    """A liar's favourite: the honest greedy answer with one token swapped for the local
    runner-up where the two nearly tie. The client gets the local choice there; within the
    noise margin it is a near-tie (not blamed, the prefix saved), outside it a lie."""
    producer = Identity.load_or_create(tmp_path / "p.key")
    params = SamplingParams(max_tokens=40)
    prompt = chat(backend, PROMPTS[1])
    gen = backend.generate(prompt, params)
    margin, at, runner_up = walk_rows(backend, prompt, gen.tokens)[0]
    swapped = list(gen.tokens)
    swapped[at] = runner_up
    entry, key = signed(backend, producer, prompt, params, swapped, gen.finish_reason)
    v = verify_draft(backend, entry, key, MH, prompt, params, VerifyConfig(near_tie_margin=margin))
    assert v.kind == "near_tie" and v.position == at and not v.blamed, v.reason
    assert v.outcome is not None and v.outcome.generation is not None
    assert v.outcome.accepted == at
    got = v.outcome.generation.tokens
    assert got[: at + 1] == gen.tokens[: at + 1] and got != swapped  # the local choice at `at`
    strict = VerifyConfig(near_tie_margin=margin / 2)
    v = verify_draft(backend, entry, key, MH, prompt, params, strict)
    assert v.kind == "lie" and v.blamed and v.position == at


def test_other_top_k_tokens_in_a_sampled_answer_are_lies(
    backend: LlamaBackend, tmp_path: Path
) -> None:
    """A sampled answer steered token by token through the local top-k (from its first token
    on): the first steered token is caught, far from the seeded draw, and since the first row
    is generation's own the client gets exactly the local answer."""
    producer = Identity.load_or_create(tmp_path / "p.key")
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=21)
    prompt = chat(backend, PROMPTS[2])
    gen = backend.generate(prompt, params)
    s = backend.score(prompt, gen.tokens, top_k=40, chunk=128, merged=False)
    steered = list(gen.tokens)
    for j in range(0, len(steered), 4):  # every 4th token: 12 places below the sampled one
        ids = s.top_ids[j]
        if steered[j] in ids[:28] and not backend.is_eog(ids[ids.index(steered[j]) + 12]):
            steered[j] = ids[ids.index(steered[j]) + 12]
    assert steered[0] != gen.tokens[0]
    entry, key = signed(backend, producer, prompt, params, steered, "length")
    v = verify_draft(backend, entry, key, MH, prompt, params)
    # Caught at the first token: its row is generation's own, so the draw is the same, the
    # steered token is far from it (a lie) and the client gets exactly the local answer.
    assert v.kind == "lie" and v.position == 0, v.reason
    assert v.outcome is not None and v.outcome.generation is not None
    got = v.outcome.generation.tokens
    assert got == gen.tokens
    assert got != steered


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
