from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.keys import (
    ModelHashMemo,
    SamplingParams,
    canonical_input_bytes,
    input_sha256,
    model_hash,
)

MH = "ab" * 32


def test_same_request_same_bytes() -> None:
    a = canonical_input_bytes(MH, [1, 2, 3], SamplingParams(stop=("b", "a")))
    b = canonical_input_bytes(MH, [1, 2, 3], SamplingParams(stop=["a", "b", "a"]))  # type: ignore[arg-type]
    assert a == b


def test_floats_are_normalized() -> None:
    assert input_sha256(MH, [1], SamplingParams(temperature=0.7)) == input_sha256(
        MH, [1], SamplingParams(temperature=0.70000000001)
    )
    assert input_sha256(MH, [1], SamplingParams(temperature=-0.0)) == input_sha256(
        MH, [1], SamplingParams(temperature=0.0)
    )


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"top_k": 10},
        {"min_p": 0.1},
        {"repeat_penalty": 1.1},
        {"seed": 7},
        {"max_tokens": 99},
        {"stop": ("x",)},
        {"grammar": 'root ::= "a"'},
    ],
)
def test_every_sampling_parameter_changes_the_key(change: dict) -> None:
    base = SamplingParams()
    assert input_sha256(MH, [1, 2], base) != input_sha256(MH, [1, 2], base.with_(**change))


def test_model_and_tokens_change_the_key() -> None:
    p = SamplingParams()
    assert input_sha256(MH, [1, 2], p) != input_sha256("cd" * 32, [1, 2], p)
    assert input_sha256(MH, [1, 2], p) != input_sha256(MH, [1, 2, 3], p)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 2},
        {"max_tokens": 0},
        {"seed": -1},
        {"top_k": 1.5},
        {"temperature": float("nan")},
        {"stop": ("",)},
        {"max_tokens": True},
    ],
)
def test_invalid_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@given(
    temperature=st.floats(0, 2, allow_nan=False),
    top_k=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=3),
    tokens=st.lists(st.integers(0, 262_143), max_size=50),
)
def test_key_is_a_function_of_the_request(temperature, top_k, seed, stop, tokens) -> None:
    p1 = SamplingParams(temperature=temperature, top_k=top_k, seed=seed, stop=tuple(stop))
    p2 = SamplingParams.from_dict(p1.to_dict())
    assert p1 == p2
    assert input_sha256(MH, tokens, p1) == input_sha256(MH, list(tokens), p2)


def test_model_hash_is_memoized_and_invalidated(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"x" * 10_000)
    memo = ModelHashMemo(tmp_path / "memo.json")
    hashed: list[int] = []
    h1 = model_hash(f, memo, progress=lambda done, total: hashed.append(done))
    assert hashed, "first call must hash the file"
    hashed.clear()
    assert model_hash(f, memo, progress=lambda done, total: hashed.append(done)) == h1
    assert not hashed, "an unchanged file must not be rehashed"
    f.write_bytes(b"GGUF" + b"y" * 10_001)
    h2 = model_hash(f, memo, progress=lambda done, total: hashed.append(done))
    assert hashed and h2 != h1


def test_corrupt_memo_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF1234")
    (tmp_path / "memo.json").write_text("{not json")
    memo = ModelHashMemo(tmp_path / "memo.json")
    import hashlib

    assert model_hash(f, memo) == hashlib.sha256(b"GGUF1234").hexdigest()
