"""How a model's chat messages become a prompt: `chat_format` picks one from GGUF metadata.

- ``template``: the GGUF's own ``tokenizer.chat_template``; for an instruction-tuned model that
  carries none, the template of its family (`GEMMA`, else `CHATML`).
- ``transcript``: a base model (no template, not instruction-tuned, such as the embedded Gemma 3
  270M) was never trained on turn markers and answers them with garbage; it continues a plain
  written dialogue well. `TRANSCRIPT` renders one, and generation stops where the model starts
  the next turn (`TRANSCRIPT_STOPS`).

Templates are written on one line so Jinja adds no stray whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


TRANSCRIPT_PREAMBLE = (
    "A conversation between a user and a helpful assistant. "
    "The assistant gives short, correct answers."
)
"""The dialogue's first line, unless the conversation starts with a system message."""

# Two example turns: with them the 270M base model answers in one plain sentence instead of
# echoing the question or rambling (tried on 14 simple questions, greedy). They are the same
# for every conversation, so their KV is a prefix the KV cache reuses.
TRANSCRIPT_EXAMPLES = (
    "User: Hello!\nAssistant: Hello! How can I help you?\n"
    "User: What is the capital of Italy?\nAssistant: The capital of Italy is Rome.\n"
)

TRANSCRIPT = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] | trim }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{{ preamble }}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ '\n\n' + examples }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ 'Assistant: ' }}"
    "{%- elif message['role'] == 'system' -%}{{ 'System: ' }}"
    "{%- else -%}{{ 'User: ' }}{%- endif -%}"
    "{{ message['content'] | trim }}{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
"""A plain dialogue: preamble (or the system message), the examples, then ``User: ...`` and
``Assistant: ...`` lines, ending in ``Assistant:`` for the model to continue."""

TRANSCRIPT_STOPS = ("\nUser:", "\nAssistant:")
"""Where a transcript answer ends: the model starting the next turn, as either speaker."""

ChatFormatName = Literal["template", "transcript"]

# Name parts that mark an instruction-tuned model ("gemma-3-270m-it", "Qwen2.5-0.5B-Instruct").
_TUNED_WORDS = frozenset({"it", "instruct", "instruction", "chat", "sft"})
_NAME_KEYS = ("general.name", "general.finetune", "general.basename")


@dataclass(frozen=True)
class ChatFormat:
    """How `LlamaBackend.chat_tokens` renders messages: a Jinja template, and the stop strings
    every chat request gets (empty for real templates: they end the turn with a token)."""

    name: ChatFormatName
    template: str
    stops: tuple[str, ...] = ()
    variables: tuple[tuple[str, str], ...] = ()  # extra template variables


def fallback_template(architecture: str) -> str:
    return GEMMA if architecture.startswith("gemma") else CHATML


def is_instruction_tuned(metadata: dict[str, Any]) -> bool:
    """Whether the GGUF's name, finetune or basename says it is tuned for chat or instructions
    (whole words only: the "it" of "gemma-3-270m-it", not of "Little")."""
    for key in _NAME_KEYS:
        words = re.split(r"[^a-z0-9]+", str(metadata.get(key) or "").lower())
        if _TUNED_WORDS.intersection(words):
            return True
    return False


def chat_format(metadata: dict[str, Any]) -> ChatFormat:
    """The GGUF's own template if it has one; else its family's template for a tuned model, or
    a plain transcript for a base model."""
    template = metadata.get("tokenizer.chat_template")
    if template:
        return ChatFormat("template", str(template))
    if is_instruction_tuned(metadata):
        return ChatFormat("template", fallback_template(metadata.get("general.architecture", "")))
    variables = (("preamble", TRANSCRIPT_PREAMBLE), ("examples", TRANSCRIPT_EXAMPLES))
    return ChatFormat("transcript", TRANSCRIPT, TRANSCRIPT_STOPS, variables)
