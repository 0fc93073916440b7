"""The OpenAI response bodies, one builder each: a completion and a chat completion, whole or
as stream chunks, with p2pcache's ``x_cache`` object (which cache level served the answer)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any, ClassVar

from starlette.responses import JSONResponse

from p2pcache.resolver import Answer, Keyed

Json = dict[str, Any]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class FastJSON(JSONResponse):
    """Compact UTF-8 JSON (no ASCII escapes, no spaces)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def x_cache(a: Answer) -> Json:
    """What served the answer and what it cost; L1, L2 and peer-KV answers add their evidence."""
    timings = {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(a.timings).items()}
    x: Json = {
        "level": a.cache_level,
        "input_sha256": a.input_sha256,
        "model_hash": a.model_hash,
        "single_flight": a.single_flight,
        "timings": timings,
    }
    if a.cache_level == "L1":  # how similar the cached prompt was and what the gate scored
        s = a.semantic
        x["semantic"] = (
            {}
            if s is None
            else {
                "similarity": s.similarity,
                "tau": s.tau,
                "source_input_sha256": s.source_input_sha256,
                "gate": s.gate,
            }
        )
    if a.peer is not None:  # L2: which peer, verified, fetch and verification times
        x["peer"] = asdict(a.peer)
    if a.kv_peer is not None:  # L3 resumed from KV chunks fetched from a peer
        x["kv_peer"] = {k: v for k, v in asdict(a.kv_peer).items() if v is not None}
    return x


def x_cache_live(keyed: Keyed) -> Json:
    """The ``x_cache`` of a live stream's text chunks: level and key (timings come last)."""
    return {
        "level": "L3",
        "input_sha256": keyed.key,
        "model_hash": keyed.model_hash,
        "single_flight": False,
    }


def cache_headers(level: str, key: str) -> dict[str, str]:
    return {"X-Cache-Level": level, "X-Cache-Key": key}


def usage(a: Answer) -> dict[str, int]:
    p, c = a.timings.prompt_tokens, a.timings.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Bodies:
    """One response's bodies (one id and creation time for all its chunks). Subclasses give
    the object names and where the text goes."""

    PREFIX: ClassVar[str] = ""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.id = self.PREFIX + uuid.uuid4().hex
        self.created = int(time.time())

    def answer(self, a: Answer) -> Json:
        """The whole (non-streamed) response."""
        raise NotImplementedError

    def chunk(self, text: str | None, finish: str | None, x: Json, *, first: bool = False) -> Json:
        """One stream chunk: a piece of text (None: no text, e.g. the final chunk)."""
        raise NotImplementedError

    def _head(self, object: str) -> Json:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model_id}

    def usage_chunk(self, a: Answer, x: Json) -> Json:
        """``stream_options.include_usage``: the chunk after the final one, with no choices."""
        u = self.chunk(None, None, x)
        u["choices"] = []
        u["usage"] = usage(a)
        return u


class CompletionBodies(Bodies):
    PREFIX = "cmpl-"

    def answer(self, a: Answer) -> Json:
        choice = {"index": 0, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
        return self._head("text_completion") | {
            "choices": [choice],
            "usage": usage(a),
            "system_fingerprint": None,
            "x_cache": x_cache(a),
        }

    def chunk(self, text: str | None, finish: str | None, x: Json, *, first: bool = False) -> Json:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice], "x_cache": x}


class ChatBodies(Bodies):
    PREFIX = "chatcmpl-"

    def answer(self, a: Answer) -> Json:
        message = {"role": "assistant", "content": a.text, "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": a.finish_reason,
        }
        return self._head("chat.completion") | {
            "choices": [choice],
            "usage": usage(a),
            "system_fingerprint": None,
            "x_cache": x_cache(a),
        }

    def chunk(self, text: str | None, finish: str | None, x: Json, *, first: bool = False) -> Json:
        delta: Json = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head("chat.completion.chunk") | {
            "system_fingerprint": None,
            "choices": [choice],
            "x_cache": x,
        }
