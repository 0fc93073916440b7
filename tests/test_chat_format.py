"""Chat on a base model: a GGUF with no chat template that is not instruction-tuned (the
embedded Gemma 3 270M) gets a plain transcript it continues, cut at the next turn; models with
a template, or tuned ones, keep a real template."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2pcache.backend import LlamaBackend
from p2pcache.backend.chat_templates import (
    CHATML,
    GEMMA,
    TRANSCRIPT_STOPS,
    chat_format,
    is_instruction_tuned,
)
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.resolver import Request, Resolver

BASE = {
    "general.architecture": "gemma3",
    "general.name": "Gemma 3 270m",
    "general.basename": "gemma-3",
}


def test_a_gguf_template_is_kept() -> None:
    fmt = chat_format(BASE | {"tokenizer.chat_template": "{{ messages }}"})
    assert (fmt.name, fmt.template, fmt.stops) == ("template", "{{ messages }}", ())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("general.name", "Gemma 3 270m It"),
        ("general.finetune", "instruct"),
        ("general.basename", "Qwen2.5-0.5B-Chat"),
        ("general.name", "gemma-3-270m-it"),
    ],
)
def test_a_tuned_model_without_template_gets_its_family_template(key: str, value: str) -> None:
    meta = BASE | {key: value}
    assert is_instruction_tuned(meta)
    assert chat_format(meta).template == GEMMA
    assert chat_format(meta | {"general.architecture": "qwen2"}).template == CHATML


def test_a_base_model_gets_a_transcript() -> None:
    # "it" must be a whole word: "Little" or "Summit" do not make a model tuned.
    for meta in (BASE, BASE | {"general.name": "Little Summit 1B"}, {}):
        fmt = chat_format(meta)
        assert not is_instruction_tuned(meta)
        assert fmt.name == "transcript" and fmt.stops == TRANSCRIPT_STOPS


def test_the_transcript_reads_as_a_dialogue(backend: LlamaBackend) -> None:
    assert backend.chat_format.name == "transcript"  # the embedded GGUF is a base model
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": " Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = backend.detokenize(backend.chat_tokens(messages))
    assert text.startswith("You are terse.\n\nUser: Hello!\n")  # system line, then examples
    assert text.endswith("User: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:")
    assert backend.chat_tokens(messages)[0] == backend.bos_token
    default = backend.detokenize(backend.chat_tokens([{"role": "user", "content": "Hi"}]))
    assert default.startswith("A conversation between a user and a helpful assistant.")


def test_chat_stops_are_part_of_the_key(resolver: Resolver) -> None:
    params = SamplingParams(max_tokens=8, stop=("END",))
    req = Request(messages=({"role": "user", "content": "Hi"},), params=params)
    keyed = trio.run(resolver.keyed, req)
    assert set(keyed.request.params.stop) == {"END", *TRANSCRIPT_STOPS}
    assert keyed.key == input_sha256(resolver.model_hash, keyed.tokens, keyed.request.params)
    assert keyed.key != input_sha256(resolver.model_hash, keyed.tokens, params)
    completion = trio.run(resolver.keyed, Request(prompt="Hi", params=params))
    assert completion.request.params == params  # completions are left as they are


# Simple questions the 270M base model answers right in the transcript format (greedy).
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What do bees make?", "honey"),
    ("What language is spoken in Brazil?", "Portuguese"),
]


@pytest.mark.parametrize(("question", "word"), QUESTIONS)
def test_chat_on_the_embedded_model_answers_the_question(
    resolver: Resolver, question: str, word: str
) -> None:
    messages: tuple[dict[str, Any], ...] = ({"role": "user", "content": question},)
    req = Request(messages=messages, params=SamplingParams(max_tokens=32))
    answer = trio.run(resolver.resolve, req)
    assert word in answer.text, answer.text
    # One turn, ended by the model starting the next one (not cut by max_tokens).
    assert answer.finish_reason == "stop" and "User:" not in answer.text
