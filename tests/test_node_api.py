"""The node daemon as a separate process, called over HTTP with the official `openai` client."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from p2pcache.node.cluster import NodeProcess, start_node
from p2pcache.store import Store

pytestmark = pytest.mark.model
HTTP_TIMEOUT = 180.0  # bounded: the model may share the CPU with other work


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = start_node("api", tmp_path_factory.mktemp("node-api"), extra=("--n-ctx", "1024"))
    yield n
    assert n.stop() == 0, n.log_tail()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=node.url + "/v1", api_key="unused", timeout=HTTP_TIMEOUT, max_retries=0
    )


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def x_cache(obj: object) -> dict:
    extra = getattr(obj, "model_extra", None) or {}
    return extra["x_cache"]


def status(node: NodeProcess) -> dict:
    r = httpx.get(node.url + "/admin/status", timeout=10)
    assert r.status_code == 200
    return r.json()


def test_completions_report_cache_level(node: NodeProcess, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    prompt = unique("The capital of France is")
    first = client.completions.create(model=model, prompt=prompt, max_tokens=6)
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6)
    second = raw.parse()
    assert x_cache(first)["level"] == "L3"
    assert x_cache(second)["level"] == "L0" and raw.headers["X-Cache-Level"] == "L0"
    assert second.choices[0].text == first.choices[0].text
    assert x_cache(first)["input_sha256"] == x_cache(second)["input_sha256"]
    assert first.usage.completion_tokens == second.usage.completion_tokens <= 6
    assert x_cache(first)["timings"]["decode_ms"] > 0


def test_chat_completions_streamed_and_not(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": unique("Say hello.")}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    assert x_cache(plain)["level"] == "L3" and plain.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True)
    )
    assert {x_cache(c)["level"] for c in chunks} == {"L0"}
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == plain.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    # Streamed first (computed), then the same request non-streamed (cached).
    messages2 = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": unique("Name a color.")},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages2,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["X-Cache-Level"] == "L3"
    streamed = list(raw.parse())
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    again = client.chat.completions.create(model=model, messages=messages2, max_tokens=8)
    assert x_cache(again)["level"] == "L0" and again.choices[0].message.content == text


def test_share_opt_in_and_private_default(node: NodeProcess, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    private = client.completions.create(model=model, prompt=unique("One"), max_tokens=2)
    shared = client.completions.create(
        model=model, prompt=unique("Two"), max_tokens=2, extra_body={"share": True}
    )
    r = httpx.get(node.url + "/admin/cache", params={"entries": 1000}, timeout=10)
    flags = {e["input_sha256"]: e["privacy_flag"] for e in r.json()["entries"]}
    assert flags[x_cache(private)["input_sha256"]] is True
    assert flags[x_cache(shared)["input_sha256"]] is False


def test_bad_requests_get_clear_4xx_and_node_keeps_serving(
    node: NodeProcess, client: openai.OpenAI
) -> None:
    model = client.models.list().data[0].id
    url = node.url + "/v1/chat/completions"
    good = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def post(body: object, raw: bytes | None = None) -> httpx.Response:
        if raw is not None:
            return httpx.post(
                url, content=raw, headers={"content-type": "application/json"}, timeout=HTTP_TIMEOUT
            )
        return httpx.post(url, json=body, timeout=HTTP_TIMEOUT)

    r = post(None, raw=b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(
            model="no-such-model", messages=good["messages"], max_tokens=2
        )
    assert "does not exist on this node" in str(nf.value) and model in str(nf.value)

    with pytest.raises(openai.BadRequestError) as neg:
        client.completions.create(model=model, prompt="Hi", max_tokens=-5)
    assert "max_tokens" in str(neg.value) and "greater than or equal to 1" in str(neg.value)

    long_prompt = "word " * 3000  # > n_ctx 1024 tokens
    r = post({**good, "messages": [{"role": "user", "content": long_prompt}]})
    err = r.json()["error"]
    assert (
        r.status_code == 400
        and err["code"] == "context_length_exceeded"
        and "context window" in err["message"]
    )

    for field, value in (
        ("max_tokens", "ten"),
        ("messages", "hi"),
        ("temperature", "hot"),
        ("stream", "yes"),
        ("seed", 1.5),
        ("stop", 3),
    ):
        r = post({**good, field: value})
        assert r.status_code == 400, (field, r.text)
        assert (
            r.json()["error"]["param"].split(".")[0] == field
            and field in r.json()["error"]["message"]
        )
    r = post({**good, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post({**good, "bogus": 1})
    assert r.status_code == 400 and "unsupported field 'bogus'" in r.json()["error"]["message"]
    r = post(None, raw=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = post(None, raw=b'{"x": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    r = httpx.get(node.url + "/v1/nope", timeout=10)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]

    ok = client.chat.completions.create(**good)  # still serving
    assert x_cache(ok)["level"] in ("L0", "L3") and ok.choices[0].message.content is not None


def test_32_identical_concurrent_requests_run_the_model_once(node: NodeProcess) -> None:
    before = status(node)["computations"]
    body = {"model": status(node)["model"], "prompt": unique("Count to three:"), "max_tokens": 12}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with httpx.Client(timeout=HTTP_TIMEOUT, limits=limits) as http, ThreadPoolExecutor(32) as pool:
        responses = list(
            pool.map(lambda _: http.post(node.url + "/v1/completions", json=body), range(32))
        )
    assert [r.status_code for r in responses] == [200] * 32
    docs = [r.json() for r in responses]
    assert len({d["choices"][0]["text"] for d in docs}) == 1
    levels = sorted(d["x_cache"]["level"] for d in docs)
    assert levels == ["L0"] * 31 + ["L3"]
    assert status(node)["computations"] == before + 1
    metrics = httpx.get(node.url + "/metrics", timeout=10).text
    assert re.search(r"^p2pcache_model_runs_total (\d+)", metrics, re.M).group(1) == str(before + 1)


def test_models_admin_and_metrics(node: NodeProcess, client: openai.OpenAI) -> None:
    models = client.models.list().data
    st = status(node)
    assert [m.id for m in models] == [st["model"]]
    assert re.fullmatch(r"[0-9a-f]{64}", st["model_hash"]) and st["peer_id"].startswith("12D3KooW")
    assert st["queue_depth"] == 0 and st["draining"] is False
    # empty without the network layer; with it, full multiaddrs ending in our peer id
    assert all(
        a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith("/p2p/" + st["peer_id"])
        for a in st["addrs"]
    )
    for path in ("/admin/peers", "/admin/reputation"):
        doc = httpx.get(node.url + path, timeout=10).json()
        assert doc["peer_id"] == st["peer_id"] and isinstance(doc["peers"], list)
    cache = httpx.get(node.url + "/admin/cache", timeout=10).json()
    assert cache["entries"] >= 1 and cache["answers_by_level"]["L3"] >= 1
    metrics = httpx.get(node.url + "/metrics", timeout=10).text
    for name in (
        'p2pcache_answers_total{level="L0"}',
        'p2pcache_answers_total{level="L2"}',
        "p2pcache_queue_depth",
        "p2pcache_bytes_fetched_total",
        "p2pcache_bytes_served_total",
        "p2pcache_verification_failures_total",
        "p2pcache_peer_score",
        'p2pcache_http_requests_total{route="/v1/completions",status="200"}',
    ):
        assert name in metrics, name
    l3 = float(re.search(r'^p2pcache_answers_total\{level="L3"\} (\S+)', metrics, re.M).group(1))
    assert l3 == cache["answers_by_level"]["L3"]


def test_admin_providers_and_reputation_validate_their_queries(node: NodeProcess) -> None:
    key = "ab" * 32
    r = httpx.get(node.url + "/admin/providers", params={"key": key, "wait_s": "0.2"}, timeout=10)
    assert r.status_code == 200 and r.json()["providers"] == [] and r.json()["key"] == key
    for params, param in (
        ({"key": "xyz"}, "key"),
        ({"key": key, "wait_s": "600"}, "wait_s"),
        ({"key": key, "wait_s": "soon"}, "wait_s"),
        ({"key": key, "level": "L9"}, "level"),
    ):
        r = httpx.get(node.url + "/admin/providers", params=params, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.get(node.url + "/admin/reputation", params={"peer_id": "not a peer id!"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "peer_id"
    other = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    r = httpx.get(node.url + "/admin/reputation", params={"peer_id": other}, timeout=10)
    assert r.status_code == 200 and all(p["peer_id"] == other for p in r.json()["peers"])
    assert httpx.get(node.url + "/healthz", timeout=10).status_code == 200  # still serving


def test_share_by_default_node_shares_unless_the_request_says_private(tmp_path: Path) -> None:
    n = start_node("sharing", tmp_path / "sharing", extra=("--n-ctx", "1024", "--share-by-default"))
    try:
        model = n.ready["model"]
        keys = {}
        for name, extra in (
            ("default", {}),
            ("private", {"share": False}),
            ("shared", {"share": True}),
        ):
            body = {"model": model, "prompt": unique(name), "max_tokens": 2, **extra}
            r = httpx.post(n.url + "/v1/completions", json=body, timeout=HTTP_TIMEOUT)
            assert r.status_code == 200, r.text
            keys[name] = r.json()["x_cache"]["input_sha256"]
        assert status(n)["share_by_default"] is True
        entries = httpx.get(n.url + "/admin/cache", params={"entries": 10}, timeout=10).json()[
            "entries"
        ]
        flags = {e["input_sha256"]: e["privacy_flag"] for e in entries}
        assert (flags[keys["default"]], flags[keys["private"]], flags[keys["shared"]]) == (
            False,
            True,
            False,
        )
    finally:
        assert n.stop() == 0, n.log_tail()


def wait_for_log(n: NodeProcess, msg: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(rec.get("msg") == msg for rec in n.log_records()):
        assert time.monotonic() < deadline and n.proc.poll() is None, (
            f"no {msg!r} in the log:\n{n.log_tail()}"
        )
        time.sleep(0.05)  # polls the node's log file (no other channel tells us)


def test_second_signal_stops_at_once_and_still_exits_cleanly(tmp_path: Path) -> None:
    n = start_node("twice", tmp_path / "twice", extra=("--n-ctx", "1024"))
    body = {"model": n.ready["model"], "prompt": unique("Hello"), "max_tokens": 2}
    assert httpx.post(n.url + "/v1/completions", json=body, timeout=HTTP_TIMEOUT).status_code == 200
    # A long generation is in flight, so the drain the first signal starts cannot finish
    # before the second one arrives (with nothing in flight it would, and race).
    long_body = {
        "model": n.ready["model"],
        "prompt": unique("Count:") + " 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": 400,
    }
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, n.url + "/v1/completions", json=long_body, timeout=HTTP_TIMEOUT
        )
        deadline = time.monotonic() + 30
        while not status(n)["model_busy"]:
            assert time.monotonic() < deadline and not pending.done(), (
                "the long request never started"
            )
            time.sleep(0.05)
        n.signal()
        # trio coalesces a signal that arrives again before it was read: wait until the node
        # has taken the first one, then "Ctrl-C" again: no drain, but LMDB still closes.
        wait_for_log(n, "shutting down (drain)")
        n.signal()
        try:
            code = n.proc.wait(timeout=60)
        finally:
            if n.proc.poll() is None:
                n.proc.kill()
        with pytest.raises(httpx.HTTPError):  # the forced stop cut the in-flight request
            pending.result(timeout=30).raise_for_status()
    assert code == 0, n.log_tail()
    msgs = [rec.get("msg") for rec in n.log_records()]
    assert "second signal: stopping now" in msgs and msgs[-1] == "shutdown complete", msgs[-5:]
    assert not (n.data_dir / "node.json").exists()
    with Store(n.data_dir / "store") as store:
        assert store.verify() == 0 and store.stats().entries == 1


def test_full_queue_answers_429_and_503_never_hangs(tmp_path: Path) -> None:
    n = start_node(
        "busy",
        tmp_path / "busy",
        extra=("--n-ctx", "1024", "--max-queue", "1"),
        env={"P2PCACHE_QUEUE_TIMEOUT_S": "0.3"},
    )
    try:
        model = n.ready["model"]
        bodies = [
            {"model": model, "prompt": unique(f"Story {i}:"), "max_tokens": 64} for i in range(6)
        ]
        with httpx.Client(timeout=HTTP_TIMEOUT) as http, ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda b: http.post(n.url + "/v1/completions", json=b), bodies))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) <= {200, 429, 503} and 200 in codes and 429 in codes, codes
        for r in rs:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["code"] == "queue_full" and "queue is full" in err["message"]
                assert r.headers["Retry-After"] == "1"
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "queue_timeout"
        done = next(b for b, r in zip(bodies, rs, strict=False) if r.status_code == 200)
        again = httpx.post(n.url + "/v1/completions", json=done, timeout=HTTP_TIMEOUT)
        assert again.status_code == 200 and again.json()["x_cache"]["level"] == "L0"
        metrics = httpx.get(n.url + "/metrics", timeout=10).text
        assert re.search(r'^p2pcache_rejected_total\{reason="queue_full"\} [1-9]', metrics, re.M)
    finally:
        assert n.stop() == 0, n.log_tail()


def test_sigterm_under_load_drains_and_keeps_the_store_intact(tmp_path: Path) -> None:
    n = start_node("term", tmp_path / "term", extra=("--n-ctx", "1024"))
    model = n.ready["model"]
    bodies = [{"model": model, "prompt": unique(f"Poem {i}:"), "max_tokens": 48} for i in range(6)]
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT) as http, ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(http.post, n.url + "/v1/completions", json=b) for b in bodies]
            deadline = time.monotonic() + 60
            while True:  # all six requests are in: one runs, five wait for the model
                st = status(n)
                if st["model_busy"] and st["queue_depth"] == 5:
                    break
                assert time.monotonic() < deadline, st
                assert not any(f.done() for f in futures)
                time.sleep(0.05)  # poll interval of a bounded readiness poll
            n.signal()  # SIGTERM
            rs = [f.result(timeout=HTTP_TIMEOUT) for f in futures]
        code = n.proc.wait(timeout=60)
    finally:
        if n.proc.poll() is None:
            n.proc.kill()
    assert code == 0, n.log_tail()
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 1 and codes.count(503) == 5, codes
    for r in rs:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
    msgs = [rec.get("msg") for rec in n.log_records()]
    assert "shutting down (drain)" in msgs and msgs[-1] == "shutdown complete"
    assert not (n.data_dir / "node.json").exists()
    answered = next(r.json() for r in rs if r.status_code == 200)
    with Store(n.data_dir / "store") as store:
        assert store.verify() == 0
        assert store.stats().entries == 1
        entry = store.get(answered["x_cache"]["input_sha256"])
        assert entry is not None and entry.output.text == answered["choices"][0]["text"]


def test_cli_talks_to_the_running_node(node: NodeProcess) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "p2pcache", *args], capture_output=True, text=True, timeout=60
        )

    st = json.loads(cli("node", "status", "--data-dir", str(node.data_dir), "--json").stdout)
    assert st["peer_id"] == node.peer_id
    stats = json.loads(cli("cache", "stats", "--url", node.url, "--json").stdout)
    assert stats["entries"] >= 1 and "answers_by_level" in stats
    peers = json.loads(cli("node", "peers", "--url", node.url, "--json").stdout)
    assert peers["peer_id"] == node.peer_id and isinstance(peers["peers"], list)
    rep = json.loads(cli("node", "reputation", "--url", node.url, "--json").stdout)
    assert rep["peer_id"] == node.peer_id and isinstance(rep["peers"], list)
    bad = cli("node", "reputation", "--url", node.url, "--peer", "not a peer!")
    assert bad.returncode == 2 and "peer_id must be a base58 libp2p peer id" in bad.stderr
    gone = cli("node", "status", "--url", "http://127.0.0.1:1", "--json")
    assert gone.returncode == 2 and "cannot reach the node" in gone.stderr
