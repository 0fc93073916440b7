"""L2 (an entry from a peer) against L3 (computing it), and verification against generation.

    flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_l2.py [--parts verify,e2e,floor]
                                                                         [--runs 3]

``verify``: in one process, the real model. For 64- and 256-token outputs (greedy and sampled)
generate an answer (what L3 pays), sign it as a producer would, then time
`p2pcache.net.verify.verify_draft` on it: static checks + one teacher-forced pass over prompt +
claimed output walked with the request's sampler (`LlamaBackend.follow_draft`). For
comparison, the same output is also run through `LlamaBackend.score` (the full log-softmax and
top-k that verification computed before: "score ms"). bench/bench_draft.py sweeps where a draft
diverges.

``e2e``: three `p2pcache node run` processes on loopback in a line A - B - C (B bootstraps
from A, C from B; C dials A only once A's adverts reach it, as warm connections do). Per run,
one fresh prompt, 256 tokens, greedy:
  1. L3 on C: the prompt with ``seed=1`` (greedy ignores the seed, but it is part of the key, so
     nobody has it): C runs the model, same prompt, same output length;
  2. the prompt (``seed=0``) on A: A computes and advertises it;
  3. C waits on ``/admin/providers?wait_s=`` until A's advertisement reached it (an event,
     not a sleep; not timed);
  4. the prompt (``seed=0``) on C: timed from the client, the answer must say L2, verified,
     and be byte-identical to A's; then once more on C, which must be L0.
Prints medians; each row also shows the node's own split (fetch, verify) of the L2 answer.

``floor``: where a verification's time goes on this machine. One llama.cpp decode of a
prompt + its 256-token greedy answer (what `LlamaBackend.check` runs), with logits at 1, 64
and 256 rows: the 1-row decode is the transformer body alone, the rest is the LM head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "bench"))
from bench_l0 import PROMPTS  # noqa: E402  (the same long-answer prompts as the L0 bench)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- verification vs generation ---------------------------------------------------------


def bench_verify(runs: int, sizes: list[int]) -> list[dict[str, Any]]:
    from p2pcache.backend import BackendConfig, LlamaBackend, resolve_model_path
    from p2pcache.identity import Identity
    from p2pcache.keys import ModelHashMemo, SamplingParams, input_sha256, model_hash
    from p2pcache.net.verify import verify_draft
    from p2pcache.store import Entry, Output

    tmp = Path(tempfile.mkdtemp(prefix="bench-l2-"))
    path = resolve_model_path(None)
    mh = model_hash(path, ModelHashMemo(tmp / "memo.json"))
    backend = LlamaBackend(BackendConfig(model_path=path, n_ctx=4096))
    producer = Identity.load_or_create(tmp / "producer.key")
    rows = []
    for n in sizes:
        for mode in ("greedy", "sampled"):
            gen_ms, ver_ms, score_ms, made, rejected = [], [], [], [], 0
            for i in range(runs):
                params = SamplingParams(
                    max_tokens=n, temperature=0.0 if mode == "greedy" else 0.8, seed=1000 * n + i
                )
                prompt = backend.chat_tokens(
                    [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                )
                t0 = time.perf_counter()
                gen = backend.generate(prompt, params)
                gen_ms.append((time.perf_counter() - t0) * 1000)
                made.append(len(gen.tokens))
                key = input_sha256(mh, prompt, params)
                entry = Entry(
                    input_sha256=key,
                    model_hash=mh,
                    cache_level="decoder_final",
                    output=Output(gen.tokens, gen.text, gen.finish_reason),
                    params=params.to_dict(),
                    privacy_flag=False,
                    producer=producer.peer_id,
                    verified_by_us=False,
                    prompt_tokens=len(prompt),
                )
                entry.signature = producer.sign(entry.signing_payload())
                t0 = time.perf_counter()
                verdict = verify_draft(backend, entry, key, mh, prompt, params)
                ver_ms.append((time.perf_counter() - t0) * 1000)
                scored = gen.tokens + ([backend.eog_token] if gen.finish_reason == "stop" else [])
                t0 = time.perf_counter()
                backend.score(prompt, scored, top_k=0 if mode == "greedy" else params.top_k)
                score_ms.append((time.perf_counter() - t0) * 1000)
                if not verdict.ok:  # an honest answer diverged: a finding, not a crash
                    rejected += 1
                    print(f"  honest {mode} {n}-token answer {i}: {verdict.reason}", flush=True)
            g, v = med(gen_ms), med(ver_ms)
            rows.append(
                {
                    "max_tokens": n,
                    "mode": mode,
                    "tokens": med(made),
                    "gen_ms": g,
                    "verify_ms": v,
                    "score_ms": med(score_ms),
                    "ratio": v / g,
                    "diverged": rejected,
                }
            )
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# -- end to end on three nodes --------------------------------------------------------


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    log_path: Path

    @property
    def http(self) -> str:
        url = self.ready["http"]
        return url if url.startswith("http") else f"http://{url}"


def start_node(
    name: str, data_dir: Path, bootstrap: list[str], ready_timeout: float = 180.0
) -> Node:
    cmd = [
        sys.executable,
        "-m",
        "p2pcache",
        "node",
        "run",
        "--data-dir",
        str(data_dir),
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--share-by-default",
    ]
    for b in bootstrap:
        cmd += ["--bootstrap", b]
    log_path = data_dir.parent / f"{name}.log"
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log_path.open("wb"),
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + ready_timeout
    # The daemon prints exactly one JSON "ready" line once HTTP listens (blocking read; the
    # deadline is enforced by killing the node if it exits or never gets there).
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"node {name} exited (rc={proc.poll()}): {log_path.read_text()[-3000:]}"
            )
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == "ready":
            if not msg.get("addrs"):
                proc.terminate()
                raise RuntimeError(
                    f"node {name} has no p2p addresses: the network layer is not running"
                )
            return Node(name, proc, msg, log_path)
    proc.kill()
    raise RuntimeError(f"node {name} not ready in {ready_timeout} s")


def stop_node(node: Node) -> None:
    node.proc.terminate()
    try:
        node.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()


def http_json(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 300.0
) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def chat(node: Node, prompt: str, max_tokens: int, seed: int) -> tuple[float, dict[str, Any]]:
    body = {
        "model": node.ready["model"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": seed,
    }
    t0 = time.perf_counter()
    out = http_json("POST", f"{node.http}/v1/chat/completions", body)
    return (time.perf_counter() - t0) * 1000, out


def x_cache(resp: dict[str, Any]) -> dict[str, Any]:
    return resp.get("x_cache") or {}


def bench_e2e(runs: int, n_tokens: int, keep: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-l2-e2e-"))
    nodes: list[Node] = []
    rows: list[dict[str, Any]] = []
    try:
        a = start_node("A", tmp / "A", [])
        nodes.append(a)
        b = start_node("B", tmp / "B", [a.ready["addrs"][0]])
        nodes.append(b)
        c = start_node("C", tmp / "C", [b.ready["addrs"][0]])
        nodes.append(c)
        for i in range(runs):
            prompt = f"{PROMPTS[i % len(PROMPTS)]} (run {i}, {time.time_ns()})"
            l3_ms, l3 = chat(c, prompt, n_tokens, seed=1)
            assert x_cache(l3).get("level") == "L3", x_cache(l3)
            _, on_a = chat(a, prompt, n_tokens, seed=0)
            assert x_cache(on_a).get("level") == "L3", x_cache(on_a)
            key = x_cache(on_a)["input_sha256"]
            seen = http_json("GET", f"{c.http}/admin/providers?key={key}&wait_s=30", timeout=60)
            if a.ready["peer_id"] not in [
                p.get("peer_id", p) if isinstance(p, dict) else p for p in seen.get("providers", [])
            ]:
                raise RuntimeError(f"A's advertisement did not reach C in 30 s: {seen}")
            l2_ms, l2 = chat(c, prompt, n_tokens, seed=0)
            xc = x_cache(l2)
            if xc.get("level") != "L2":
                raise RuntimeError(f"C answered from {xc.get('level')}, not L2: {xc}")
            text_a = on_a["choices"][0]["message"]["content"]
            if l2["choices"][0]["message"]["content"] != text_a:
                raise RuntimeError("L2 answer differs from A's")
            l0_ms, l0 = chat(c, prompt, n_tokens, seed=0)
            assert x_cache(l0).get("level") == "L0", x_cache(l0)
            peer = xc.get("peer", {})
            rows.append(
                {
                    "l3_ms": l3_ms,
                    "l2_ms": l2_ms,
                    "l0_ms": l0_ms,
                    "tokens": l2.get("usage", {}).get("completion_tokens"),
                    "l3_tokens": l3.get("usage", {}).get("completion_tokens"),
                    "fetch_ms": peer.get("fetch_ms"),
                    "verify_ms": peer.get("verify_ms"),
                    "verified": peer.get("verified"),
                    "bytes": peer.get("bytes"),
                }
            )
            print(f"  run {i}: {json.dumps(rows[-1])}", flush=True)
    finally:
        for n in reversed(nodes):
            stop_node(n)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return {"rows": rows}


def bench_floor(runs: int, n_tokens: int = 256) -> list[tuple[int, int, float]]:
    """(input tokens, logit rows, median ms) of one decode of prompt + answer."""
    from p2pcache.backend import BackendConfig, LlamaBackend, resolve_model_path
    from p2pcache.keys import SamplingParams

    backend = LlamaBackend(BackendConfig(model_path=resolve_model_path(None), n_ctx=4096))
    llm = backend.llm
    prompt = backend.chat_tokens([{"role": "user", "content": PROMPTS[0]}])  # as the verify part
    gen = backend.generate(prompt, SamplingParams(max_tokens=n_tokens, temperature=0.0))
    toks = list(prompt) + list(gen.tokens)
    out = []
    for rows in (1, 64, n_tokens):
        times = []
        for _ in range(runs + 1):  # the first is a warm-up
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm._batch.set_batch(batch=toks, n_past=0, logits_all=True)
            for j in range(len(toks) - rows):
                llm._batch.batch.logits[j] = False
            t0 = time.perf_counter()
            llm._ctx.decode(llm._batch)
            times.append((time.perf_counter() - t0) * 1000)
        out.append((len(toks), rows, med(times[1:])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="verify,e2e", help="comma list of verify, e2e, floor")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--e2e-tokens", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the e2e data dirs and node logs")
    a = ap.parse_args()
    parts = a.parts.split(",")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f} at start")
    if "verify" in parts:
        rows = bench_verify(a.runs, [int(x) for x in a.sizes.split(",")])
        print(f"\nVerification vs generation, Gemma 3 270M Q4_K_M, medians of {a.runs} prompts")
        print(
            f"{'max_tokens':>10} {'mode':<8} {'tokens':>6} {'generate ms':>12} {'verify ms':>10} "
            f"{'verify/gen':>17} {'diverged':>8} {'score ms':>9}"
        )
        for r in rows:
            print(
                f"{r['max_tokens']:>10} {r['mode']:<8} {r['tokens']:>6.0f} {r['gen_ms']:>12.1f} "
                f"{r['verify_ms']:>10.1f} {r['ratio']:>8.3f} (1/{1 / r['ratio']:4.1f}) "
                f"{r['diverged']:>5}/{a.runs:<2} {r['score_ms']:>9.1f}"
            )
        print(
            "diverged: honest answers the walk did not accept whole (the answer was then this "
            "node's own from the divergence on); score ms: the same output through "
            "LlamaBackend.score (full log-softmax, top-k), as verification ran before"
        )
    if "floor" in parts:
        print(f"\nOne decode of prompt + 256-token answer, logits at k rows, medians of {a.runs}")
        print(f"{'input tokens':>12} {'logit rows':>10} {'decode ms':>10}")
        for n, rows, ms in bench_floor(a.runs):
            print(f"{n:>12} {rows:>10} {ms:>10.1f}")
        print(
            "1 row: the transformer body alone; "
            "the difference to k rows: the LM head at k positions"
        )
    if "e2e" in parts:
        print(
            f"\nEnd to end on C, line A - B - C, {a.e2e_tokens} tokens greedy, "
            "separate node processes",
            flush=True,
        )
        res = bench_e2e(a.runs, a.e2e_tokens, a.keep)["rows"]
        if res:
            l3, l2, l0 = (med([r[k] for r in res]) for k in ("l3_ms", "l2_ms", "l0_ms"))
            f = med([r["fetch_ms"] for r in res if r["fetch_ms"] is not None])
            v = med([r["verify_ms"] for r in res if r["verify_ms"] is not None])
            print(f"\nmedians of {len(res)} runs (client-side HTTP round trip)")
            print(
                f"{'L3 on C ms':>11} {'L2 on C ms':>11} {'of which fetch':>15} {'verify':>8} "
                f"{'L0 on C ms':>11} "
                f"{'L3/L2':>7} {'tokens':>7}"
            )
            print(
                f"{l3:>11.1f} {l2:>11.1f} {f:>15.1f} {v:>8.1f} {l0:>11.1f} {l3 / l2:>6.1f}x "
                f"{med([r['tokens'] for r in res if r['tokens']]):>7.0f}"
            )


if __name__ == "__main__":
    main()
