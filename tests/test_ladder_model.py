"""The L0/L3 ladder on the real model (Gemma 3 270M)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from p2pcache.identity import Identity, verify_signature
from p2pcache.keys import SamplingParams
from p2pcache.local import LocalNode, NodeOptions
from p2pcache.resolver import Request, Resolver
from p2pcache.store import Store

pytestmark = pytest.mark.model

PROMPT = "The three primary colors are"


def run(resolver: Resolver, request: Request):  # type: ignore[no-untyped-def]
    return trio.run(resolver.resolve, request)


def test_second_identical_request_is_l0_and_byte_identical(resolver: Resolver) -> None:
    req = Request(prompt=PROMPT, params=SamplingParams(max_tokens=16))
    first = run(resolver, req)
    second = run(resolver, req)
    assert first.cache_level == "L3" and second.cache_level == "L0"
    assert first.text.encode() == second.text.encode() and first.tokens == second.tokens
    assert first.input_sha256 == second.input_sha256
    assert first.timings.completion_tokens > 0 and first.timings.prefill_ms > 0
    assert second.timings.prefill_ms == 0 and second.timings.decode_ms == 0
    assert resolver.computations == 1


def test_greedy_is_deterministic_without_the_cache(resolver: Resolver) -> None:
    params = SamplingParams(max_tokens=12)
    tokens = resolver.worker.backend.tokenize(PROMPT)
    a = resolver.worker.backend.generate(tokens, params)
    b = resolver.worker.backend.generate(tokens, params)
    assert a.tokens == b.tokens


def test_sampled_output_is_reproducible_from_its_seed(resolver: Resolver) -> None:
    backend = resolver.worker.backend
    tokens = backend.tokenize("Once upon a time")
    runs = [
        backend.generate(tokens, SamplingParams(temperature=1.0, seed=s, max_tokens=16))
        for s in (5, 5, 6)
    ]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"top_k": 5},
        {"min_p": 0.2},
        {"repeat_penalty": 1.3},
        {"seed": 9},
        {"max_tokens": 9},
        {"stop": (".",)},
    ],
)
def test_any_sampling_change_is_a_miss(resolver: Resolver, change: dict) -> None:
    base = SamplingParams(max_tokens=8)
    assert run(resolver, Request(prompt=PROMPT, params=base)).cache_level == "L3"
    changed = run(resolver, Request(prompt=PROMPT, params=base.with_(**change)))
    assert changed.cache_level == "L3"
    assert run(resolver, Request(prompt=PROMPT, params=base)).cache_level == "L0"


def test_chat_template_changes_the_key(resolver: Resolver) -> None:
    params = SamplingParams(max_tokens=8)
    plain = run(resolver, Request(prompt="Say hi", params=params))
    chat = run(resolver, Request(messages=({"role": "user", "content": "Say hi"},), params=params))
    assert chat.cache_level == "L3" and chat.input_sha256 != plain.input_sha256


def test_private_and_shared_entries(resolver: Resolver, store: Store) -> None:
    priv = run(resolver, Request(prompt="Private question", params=SamplingParams(max_tokens=4)))
    pub = run(
        resolver, Request(prompt="Public question", params=SamplingParams(max_tokens=4), share=True)
    )
    e_priv, e_pub = store.get(priv.input_sha256), store.get(pub.input_sha256)
    assert e_priv is not None and e_priv.privacy_flag is True
    assert e_pub is not None and e_pub.privacy_flag is False
    # The producer's signature binds the output to the key and the model.
    ident = resolver.identity
    assert e_pub.producer == ident.peer_id
    assert verify_signature(ident.public_bytes, e_pub.signature, e_pub.signing_payload())


def test_corrupt_value_is_not_served(resolver: Resolver, store: Store) -> None:
    req = Request(prompt=PROMPT, params=SamplingParams(max_tokens=6))
    first = run(resolver, req)
    k = bytes.fromhex(first.input_sha256)
    with store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(k, db=store._entries))
        raw[40] ^= 0x55
        txn.put(k, bytes(raw), db=store._entries)
    again = run(resolver, req)
    assert again.cache_level == "L3", "a corrupt entry must never be served"
    assert again.text == first.text
    assert store.stats().corrupt_dropped == 1
    assert run(resolver, req).cache_level == "L0"  # re-stored intact


def test_concurrent_identical_requests_compute_once(resolver: Resolver) -> None:
    req = Request(prompt="Name a fruit:", params=SamplingParams(max_tokens=8))
    answers = []

    async def main() -> None:
        async def one() -> None:
            answers.append(await resolver.resolve(req))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)

    trio.run(main)
    assert resolver.computations == 1
    assert len({a.text for a in answers}) == 1
    assert sorted(a.cache_level for a in answers).count("L3") == 1


def test_a_different_model_file_is_a_miss(model_path: Path, tmp_path: Path) -> None:
    """A real second GGUF (same weights, one metadata byte changed) has another model_hash:
    its entries never mix with the first model's."""
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_path, other)
    with other.open("r+b") as f:
        head = f.read(1 << 20)
        at = head.find(b"Gemma 3 270m")
        assert at > 0
        f.seek(at + len("Gemma 3 270"))
        f.write(b"X")
    data = tmp_path / "node"
    req = Request(prompt=PROMPT, params=SamplingParams(max_tokens=6))
    with LocalNode.open(NodeOptions(data_dir=data, n_ctx=1024)) as a:
        ra = trio.run(a.resolve, req)
        assert trio.run(a.resolve, req).cache_level == "L0"
    with LocalNode.open(NodeOptions(data_dir=data, model=other, n_ctx=1024)) as b:
        assert b.model_hash != a.model_hash
        rb = trio.run(b.resolve, req)
        assert rb.cache_level == "L3" and rb.input_sha256 != ra.input_sha256
        assert {e.model_hash for e in b.store.iter_entries()} == {a.model_hash, b.model_hash}


def test_identity_persists(tmp_path: Path) -> None:
    a = Identity.load_or_create(tmp_path / "id.key")
    b = Identity.load_or_create(tmp_path / "id.key")
    assert a.peer_id == b.peer_id and a.peer_id.startswith("12D3KooW")
    assert (tmp_path / "id.key").stat().st_mode & 0o777 == 0o600


def test_failed_store_write_still_answers(
    resolver: Resolver, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pcache.store import StoreError

    def full(entry):  # type: ignore[no-untyped-def]
        raise StoreError("disk full")

    monkeypatch.setattr(store, "put", full)
    req = Request(prompt="Disk full?", params=SamplingParams(max_tokens=4))
    a = run(resolver, req)
    assert a.cache_level == "L3" and a.timings.completion_tokens > 0
    assert run(resolver, req).cache_level == "L3"  # nothing was stored
