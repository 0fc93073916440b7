"""What goes into the lookup ladder and what comes out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams
from p2pcache.store import Entry, Output

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


@dataclass(frozen=True)
class Keyed:
    """A request after tokenization, with its exact key."""

    request: Request
    tokens: list[int]
    key: str
    model_hash: str


@dataclass
class Timings:
    total_ms: float = 0.0
    lookup_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens restored from a stored KV prefix
    peer_prompt_tokens: int = (
        0  # ... of which came from KV chunks fetched from a peer for this request
    )
    completion_tokens: int = 0
    # L2: tokens of the peer's answer the local model's own choices confirmed, and tokens
    # generated here after the first divergence (L3: all of them are local).
    accepted_tokens: int = 0
    local_tokens: int = 0


@dataclass(frozen=True)
class PeerDetails:
    """An L2 answer: which peer served it, who produced it, and what fetching it cost."""

    peer: str
    producer: str
    verified: bool
    fetch_ms: float
    verify_ms: float
    bytes: int


@dataclass(frozen=True)
class KvPeerDetails:
    """An L3 answer that resumed from KV prefix chunks fetched from a peer for this request."""

    peer: str
    tokens: int  # prompt tokens restored from the fetched chunks (0 when they were rejected)
    chunks: int
    bytes: int
    fetch_ms: float
    spot_checked: bool
    rejected: bool
    spot_check_diff: float | None = None


@dataclass(frozen=True)
class SemanticDetails:
    """An L1 answer: the similar cached prompt it came from and what the quality gate scored."""

    similarity: float
    tau: float
    source_input_sha256: str
    source_prompt: str
    gate: dict[str, Any] | None  # `GateResult.to_dict()`; None when the gate is off


@dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str
    cache_level: Level
    input_sha256: str
    model_hash: str
    timings: Timings
    single_flight: bool = False  # waited for an identical request's computation (served as L0)
    peer: PeerDetails | None = None  # L2
    kv_peer: KvPeerDetails | None = None  # L3 resumed from a peer's KV chunks
    semantic: SemanticDetails | None = None  # L1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_from_output(
    output: Output,
    keyed: Keyed,
    level: Level,
    *,
    timings: Timings | None = None,
    single_flight: bool = False,
    peer: PeerDetails | None = None,
    kv_peer: KvPeerDetails | None = None,
    semantic: SemanticDetails | None = None,
) -> Answer:
    """The answer to ``keyed`` that replays ``output``, whichever level produced it. Without
    ``timings`` only the token counts are set (a stored answer costs no model time)."""
    return Answer(
        text=output.text,
        tokens=list(output.tokens),
        finish_reason=output.finish_reason,
        cache_level=level,
        input_sha256=keyed.key,
        model_hash=keyed.model_hash,
        timings=timings
        or Timings(prompt_tokens=len(keyed.tokens), completion_tokens=len(output.tokens)),
        single_flight=single_flight,
        peer=peer,
        kv_peer=kv_peer,
        semantic=semantic,
    )


def own_entry(keyed: Keyed, output: Output, identity: Identity) -> Entry:
    """The `decoder_final` entry of an answer this node's model produced, signed by it."""
    entry = Entry(
        input_sha256=keyed.key,
        model_hash=keyed.model_hash,
        cache_level="decoder_final",
        output=output,
        params=keyed.request.params.to_dict(),
        privacy_flag=not keyed.request.share,
        producer=identity.peer_id,
        verified_by_us=True,
        prompt_tokens=len(keyed.tokens),
    )
    entry.signature = identity.sign(entry.signing_payload())
    return entry
