"""Synthetic entries for store and network tests (the model is not what is under test)."""

from __future__ import annotations

import hashlib

from p2pcache.identity import Identity
from p2pcache.net.fetch import ResponseHeader, entry_to_wire
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


def signed_response(
    server: Identity, requester: Identity, key: str, entry: Entry
) -> tuple[ResponseHeader, bytes]:
    """What ``server`` would send for ``key``: ``entry`` on the wire under a signed header
    (evidence tests build lies with it: the entry need not be the key's)."""
    body = entry_to_wire(entry)
    h = ResponseHeader(
        key,
        entry.model_hash,
        entry.cache_level,
        None,
        len(body),
        hashlib.sha256(body).hexdigest(),
        requester.peer_id,
        server.peer_id,
        1,
    )
    return ResponseHeader(**{**h.__dict__, "sig": server.sign(h.payload())}), body
