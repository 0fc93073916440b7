"""What goes into the lookup ladder and what comes out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from p2pcache.keys import SamplingParams

Level = Literal["L0", "L1", "L2", "L3"]


@dataclass(frozen=True)
class Request:
    """A completion (``prompt``) or a chat (``messages``) request."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    share: bool = False  # False: the entry never leaves this node
    semantic: bool = False  # True: a paraphrase's cached answer may serve it (L1, gated)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))


@dataclass
class Timings:
    total_ms: float = 0.0
    lookup_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens restored from a stored KV prefix
    peer_prompt_tokens: int = 0  # ... of which came from KV chunks fetched from a peer for this request
    completion_tokens: int = 0


@dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str
    cache_level: Level
    input_sha256: str
    model_hash: str
    timings: Timings
    details: dict[str, Any] = field(default_factory=dict)  # level-specific (scores, peer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
