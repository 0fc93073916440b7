"""`input_sha256`: the exact-match key of a request.

It covers everything that can change the output: the model, the token ids after the chat
template, and every sampling parameter. The encoding is canonical (sorted keys, normalized
floats, defaults filled in), so equal requests always give equal bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack

KEY_VERSION = 1
_FLOAT_DIGITS = 6


def _norm_float(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    x = round(x, _FLOAT_DIGITS)
    return 0.0 if x == 0 else x  # -0.0 and 0.0 must encode alike


@dataclass(frozen=True)
class SamplingParams:
    """Every output-changing generation parameter, with llama.cpp's defaults.

    ``temperature == 0`` means greedy decoding. ``seed`` makes sampled output reproducible;
    it defaults to 0 rather than "random" because a cache can only ever replay a seeded run.
    """

    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    grammar: str | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            object.__setattr__(self, name, _norm_float(name, getattr(self, name)))
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError("top_p must be in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0")
        for name in ("top_k", "seed", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError("seed must be in [0, 2**32)")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        # Order and duplicates of stop strings do not change the output.
        object.__setattr__(self, "stop", tuple(sorted(set(stop))))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "stop" in known and known["stop"] is not None:
            known["stop"] = tuple(known["stop"])
        elif "stop" in known:
            known.pop("stop")
        return cls(**known)

    def with_(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)


def canonical_input_bytes(
    model_hash: str, token_ids: Sequence[int], params: SamplingParams
) -> bytes:
    """The canonical msgpack encoding that `input_sha256` hashes."""
    doc = {
        "v": KEY_VERSION,
        "model_hash": model_hash,
        "tokens": [int(t) for t in token_ids],
        "params": params.to_dict(),
    }
    # Sorted keys at every level: msgpack keeps insertion order, so we fix it here.
    return msgpack.packb(_sorted(doc), use_bin_type=True)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_sorted(x) for x in obj]
    return obj


def input_sha256(model_hash: str, token_ids: Sequence[int], params: SamplingParams) -> str:
    return hashlib.sha256(canonical_input_bytes(model_hash, token_ids, params)).hexdigest()
