"""Streamed L3 answers: time to the first event vs the whole generation, and the decode cost
of streaming live (per-token hook) vs not streaming.

First, in process: the decode loop with and without the live hook (see `hook_cost`).

    flock -x /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_stream.py [--tokens 256]
                                                                             [--runs 3]

Starts `p2pcache node run` as a separate process (n_ctx 2048), then per run: one streamed
completion (a fresh prompt, so L3) read with the official `openai` client, recording when the
first chunk with text arrived and when the stream ended; one non-streamed L3 completion of the
same length (another fresh prompt) for the node-side decode ms/token without the hook; and the
streamed prompt again non-streamed (L0), whose text must equal the streamed text. Prints one
table of medians over --runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import openai

from p2pcache.node.cluster import start_node


def prompt() -> str:
    # A counting prompt keeps the model going until max_tokens (no early end of generation).
    return f"[{uuid.uuid4().hex[:8]}] Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def hook_cost(tokens: int, runs: int) -> None:
    """In process: decode ms/token of `LlamaBackend.generate` on a worker thread without the
    hook and with the live-streaming hook (`LiveText.feed` + ``run_sync_soon`` into a trio
    memory channel drained by the event loop, as the node does), alternating, plus the
    hook's own time per token."""
    import math

    import trio

    from p2pcache.api.sse import LiveText
    from p2pcache.backend import BackendConfig, LlamaBackend, resolve_model_path
    from p2pcache.keys import SamplingParams

    backend = LlamaBackend(BackendConfig(model_path=resolve_model_path(None), n_ctx=2048))
    prompt = backend.tokenize("Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
    params = SamplingParams(max_tokens=tokens)
    per_tok: dict[str, list[float]] = {"no hook": [], "live hook": []}
    hook_s: list[float] = []

    async def one(hooked: bool) -> float:
        send, recv = trio.open_memory_channel[str](math.inf)
        live = LiveText(lambda t: backend.llm.detokenize(list(t)))
        token_ = trio.lowlevel.current_trio_token()

        def hook(tok: int) -> None:
            t = time.perf_counter()
            piece = live.feed(tok)
            if piece:
                token_.run_sync_soon(send.send_nowait, piece)
            hook_s.append(time.perf_counter() - t)

        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                async for _ in recv:
                    pass

            nursery.start_soon(drain)
            gen = await trio.to_thread.run_sync(
                lambda: backend.generate(prompt, params, hook if hooked else None)
            )
            send.close()
        return gen.decode_ms / max(1, len(gen.tokens))

    for _ in range(runs):
        per_tok["no hook"].append(trio.run(one, False))
        per_tok["live hook"].append(trio.run(one, True))
    backend.llm.close()
    print(f"in process, {tokens} tokens, medians of {runs} alternating runs:")
    print("| decode ms/token, no hook | decode ms/token, live hook | hook us/token (median) |")
    print("|---:|---:|---:|")
    print(
        f"| {statistics.median(per_tok['no hook']):.2f} "
        f"| {statistics.median(per_tok['live hook']):.2f} | "
        f"{statistics.median(hook_s) * 1e6:.1f} |\n",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    hook_cost(args.tokens, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        node = start_node("stream", Path(tmp) / "node", extra=("--n-ctx", "2048"))
        try:
            client = openai.OpenAI(
                base_url=node.url + "/v1", api_key="unused", timeout=600, max_retries=0
            )
            model = node.ready["model"]
            client.completions.create(model=model, prompt=prompt(), max_tokens=8)  # warm-up
            rows = []
            for _ in range(args.runs):
                p = prompt()
                t0 = time.perf_counter()
                first = None
                texts, last = [], None
                for chunk in client.completions.create(
                    model=model, prompt=p, max_tokens=args.tokens, stream=True
                ):
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    if chunk.choices:
                        texts.append(chunk.choices[0].text)
                    last = chunk
                end = time.perf_counter() - t0
                x = (last.model_extra or {})["x_cache"]
                assert x["level"] == "L3", x
                n_tok = x["timings"]["completion_tokens"]
                plain = client.completions.create(
                    model=model, prompt=prompt(), max_tokens=args.tokens
                )
                px = (plain.model_extra or {})["x_cache"]
                again = client.completions.create(model=model, prompt=p, max_tokens=args.tokens)
                assert (again.model_extra or {})["x_cache"]["level"] == "L0"
                assert "".join(texts) == again.choices[0].text, (
                    "streamed text differs from the cached text"
                )
                rows.append(
                    {
                        "tokens": n_tok,
                        "first_s": first,
                        "end_s": end,
                        "stream_ms_tok": x["timings"]["decode_ms"] / max(1, n_tok),
                        "plain_ms_tok": px["timings"]["decode_ms"]
                        / max(1, px["timings"]["completion_tokens"]),
                    }
                )
                print(rows[-1], flush=True)
        finally:
            node.stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nmedians of {len(rows)} runs, max_tokens {args.tokens}:")
    print(
        "| completion tokens | first text chunk s | stream end s | decode ms/token streamed | "
        "decode ms/token not streamed |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {med['tokens']:.0f} | {med['first_s']:.3f} | {med['end_s']:.2f} "
        f"| {med['stream_ms_tok']:.2f} | "
        f"{med['plain_ms_tok']:.2f} |"
    )


if __name__ == "__main__":
    main()
