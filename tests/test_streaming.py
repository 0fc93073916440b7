"""Live streaming of L3 answers (`p2pcache.api.sse`): the text released token by token,
and a node process streaming to the official `openai` client while it generates."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from p2pcache.api.sse import LiveText
from p2pcache.backend import LlamaBackend
from p2pcache.keys import SamplingParams
from p2pcache.node.cluster import NodeProcess, start_node
from p2pcache.store import Store

HTTP_TIMEOUT = 180.0  # bounded: the model may share the CPU with other work


# -- LiveText, with a toy vocabulary (token id -> bytes) ------------------------------------
VOCAB = {1: b"a", 2: b" E", 3: b"N", 4: b"D", 5: b"\xe2\x82", 6: b"\xac", 7: b"x", 8: b"EN"}


def toy(stops: tuple[str, ...] = ()) -> LiveText:
    return LiveText(lambda toks: b"".join(VOCAB[t] for t in toks), stops)


def test_live_text_holds_back_a_possible_stop_string_and_cuts_at_it() -> None:
    live = toy((" END",))
    assert [live.feed(t) for t in (1, 2, 3)] == ["a", "", ""]  # " E", " EN" could become " END"
    assert live.feed(4) == "" and live.stopped  # " END" completed: cut, nothing more
    assert live.rest("a") == ""  # the decode loop's text is cut at the stop string: "a"

    live = toy((" END",))
    assert [live.feed(t) for t in (1, 2, 7)] == ["a", "", " Ex"]  # " Ex" can no longer match
    assert live.rest("a Ex") == ""


def test_live_text_releases_a_split_character_once_complete() -> None:
    live = toy()
    assert [live.feed(t) for t in (1, 5, 6, 7)] == ["a", "", "€", "x"]
    assert live.rest("a€x") == "" and live.rest("b") is None  # a wrong final text is detected


@pytest.mark.model
def test_live_text_equals_the_decode_loops_text_on_the_real_model(backend: LlamaBackend) -> None:
    prompt = backend.tokenize("Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
    for stops in ((), ("15,",), ("4, 1",), ("16", "never appears")):
        live = LiveText(lambda toks: backend.llm.detokenize(list(toks)), stops)
        pieces: list[str] = []
        gen = backend.generate(
            prompt,
            SamplingParams(max_tokens=32, stop=stops),
            on_token=lambda t, pieces=pieces, live=live: pieces.append(live.feed(t)),
        )
        rest = live.rest(gen.text)
        assert rest is not None and "".join(pieces) + rest == gen.text, stops
        assert len([p for p in pieces if p]) >= 2, (
            stops
        )  # released during generation, not at the end
        if not stops:  # the hook changes nothing
            plain = backend.generate(prompt, SamplingParams(max_tokens=32))
            assert (plain.tokens, plain.text, plain.finish_reason) == (
                gen.tokens,
                gen.text,
                gen.finish_reason,
            )


# -- a node process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = start_node("stream", tmp_path_factory.mktemp("node-stream"), extra=("--n-ctx", "1024"))
    yield n
    assert n.stop() == 0, n.log_tail()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=node.url + "/v1", api_key="unused", timeout=HTTP_TIMEOUT, max_retries=0
    )


def counting() -> str:
    """A fresh prompt (so L3) that keeps the model going until max_tokens."""
    return f"[{uuid.uuid4().hex[:8]}] Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def x_cache(obj: object) -> dict:
    return (getattr(obj, "model_extra", None) or {})["x_cache"]


def status(node: NodeProcess) -> dict:
    r = httpx.get(node.url + "/admin/status", timeout=10)
    assert r.status_code == 200
    return r.json()


@pytest.mark.model
def test_streamed_l3_completion_is_live_and_equals_the_cached_answer(
    node: NodeProcess, client: openai.OpenAI
) -> None:
    model, prompt = node.ready["model"], counting()
    before = status(node)["computations"]
    raw = client.completions.with_raw_response.create(
        model=model,
        prompt=prompt,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["X-Cache-Level"] == "L3"
    chunks = iter(raw.parse())
    first = next(chunks)
    # The first chunk is here while the model is still generating this very request.
    st = status(node)
    assert st["model_busy"] is True and st["computations"] == before + 1
    assert first.choices[0].text and x_cache(first)["level"] == "L3"
    rest = list(chunks)
    streamed = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    final, usage = rest[-2], rest[-1]
    assert final.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 48
    x = x_cache(final)
    assert (
        x["level"] == "L3"
        and x["timings"]["decode_ms"] > 0
        and x["timings"]["completion_tokens"] == 48
    )
    # node side: the first event left before the request's work (generate + store) was done
    assert x["stream"]["live"] is True and x["stream"]["first_event_ms"] < x["timings"]["total_ms"]
    assert all(
        x_cache(c)["level"] == "L3" and x_cache(c)["input_sha256"] == x["input_sha256"]
        for c in rest
    )

    again = client.completions.create(model=model, prompt=prompt, max_tokens=48)
    assert x_cache(again)["level"] == "L0" and again.choices[0].text == streamed  # byte for byte
    assert status(node)["computations"] == before + 1


@pytest.mark.model
def test_streamed_l3_chat_is_live_with_usage(node: NodeProcess, client: openai.OpenAI) -> None:
    model = node.ready["model"]
    messages = [
        {"role": "system", "content": "Continue the sequence."},
        {"role": "user", "content": counting()},
    ]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    assert status(node)["model_busy"] is True
    assert first.choices[0].delta.role == "assistant" and x_cache(first)["level"] == "L3"
    rest = list(chunks)
    text = (first.choices[0].delta.content or "") + "".join(
        c.choices[0].delta.content or "" for c in rest if c.choices
    )
    assert (
        rest[-1].usage is not None
        and rest[-1].usage.completion_tokens == x_cache(rest[-1])["timings"]["completion_tokens"]
    )
    assert "timings" in x_cache(rest[-2]) and rest[-2].choices[0].finish_reason is not None
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=32)
    assert x_cache(plain)["level"] == "L0" and plain.choices[0].message.content == text
    assert plain.choices[0].finish_reason == rest[-2].choices[0].finish_reason


@pytest.mark.model
def test_streamed_text_with_stop_strings_equals_the_cached_text(
    node: NodeProcess, client: openai.OpenAI
) -> None:
    model = node.ready["model"]
    for stop in (["15,", " 2"], "4, 1"):
        prompt = counting()
        chunks = list(
            client.completions.create(
                model=model, prompt=prompt, max_tokens=32, stop=stop, stream=True
            )
        )
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert x_cache(chunks[-1])["level"] == "L3"
        plain = client.completions.create(model=model, prompt=prompt, max_tokens=32, stop=stop)
        assert x_cache(plain)["level"] == "L0" and plain.choices[0].text == streamed, stop
        assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


@pytest.mark.model
def test_client_leaving_mid_stream_still_stores_and_single_flight_holds(
    node: NodeProcess, client: openai.OpenAI
) -> None:
    model, prompt = node.ready["model"], counting()
    body = {"model": model, "prompt": prompt, "max_tokens": 64, "stream": True}
    before = status(node)["computations"]
    with ThreadPoolExecutor(1) as pool:
        with httpx.Client(timeout=HTTP_TIMEOUT) as http:
            with http.stream("POST", node.url + "/v1/completions", json=body) as r:
                assert r.headers["X-Cache-Level"] == "L3"
                first = next(sse_events(r.iter_lines()))
                assert isinstance(first, dict) and first["choices"][0]["text"]
                # An identical request while the first one computes joins its flight.
                joined = pool.submit(
                    lambda: list(
                        client.completions.create(
                            model=model, prompt=prompt, max_tokens=64, stream=True
                        )
                    )
                )
            # the first client is gone (connection closed) mid-stream
        chunks = joined.result(timeout=HTTP_TIMEOUT)
    assert {x_cache(c)["level"] for c in chunks} == {"L0"}  # complete at once: sent as before
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(first["choices"][0]["text"])
    stored = client.completions.create(model=model, prompt=prompt, max_tokens=64)
    assert x_cache(stored)["level"] == "L0" and x_cache(stored)["single_flight"] is False
    assert stored.choices[0].text == text and stored.choices[0].finish_reason == "length"
    assert status(node)["computations"] == before + 1  # computed once, finished, stored


@pytest.mark.model
def test_sigterm_drain_waits_for_a_live_stream(tmp_path: Path) -> None:
    n = start_node(
        "drain",
        tmp_path / "drain",
        extra=("--n-ctx", "1024"),
        env={"P2PCACHE_SHUTDOWN_TIMEOUT_S": "170"},
    )  # bounded, room for a loaded CPU
    try:
        body = {"model": n.ready["model"], "prompt": counting(), "max_tokens": 32, "stream": True}
        with (
            httpx.Client(timeout=HTTP_TIMEOUT) as http,
            http.stream("POST", n.url + "/v1/completions", json=body) as r,
        ):
            events = sse_events(r.iter_lines())
            first = next(events)
            assert isinstance(first, dict) and r.headers["X-Cache-Level"] == "L3"
            n.signal()  # SIGTERM: drain
            rest = list(events)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert rest[-2]["x_cache"]["timings"]["completion_tokens"] == 32
        assert n.wait_stopped() == 0, n.log_tail()
    finally:
        if n.proc.poll() is None:
            n.proc.kill()
    with Store(n.data_dir / "store") as store:
        assert store.verify() == 0 and store.stats().entries == 1
