"""Synthetic entries for store tests (the store is what is under test, not the model)."""

from __future__ import annotations

import hashlib

from p2pcache.store import Entry, Output

MODEL = "m" * 64


def make_entry(i: int, text_len: int = 100, model_hash: str = MODEL, private: bool = True) -> Entry:
    key = hashlib.sha256(f"{model_hash}/{i}".encode()).hexdigest()
    text = f"answer-{i}-" + "x" * text_len
    return Entry(
        input_sha256=key,
        model_hash=model_hash,
        cache_level="decoder_final",
        output=Output(tokens=list(range(i % 50)), text=text),
        params={"temperature": 0.0},
        privacy_flag=private,
    )
