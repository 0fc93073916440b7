"""Verification vs generation with llama.cpp on a GPU, on synthetic models.

Self-contained: needs llama-cpp-python (a CUDA build), numpy and, to write the models, the
`gguf` package; from this repo it loads only `p2pcache/backend/logit_checks.py` (numpy), by
path, so the reductions timed are the ones nodes run. The real Gemma GGUF cannot travel to
the GPU machine, so the models are random-weight GGUFs of real shapes (llama architecture,
F16, a vocabulary of byte tokens plus fillers): weights' values do not change speed.

For each model and output length (64, 256 tokens), from an empty KV cache:
- generate: prefill the prompt, then decode token by token with llama-cpp-python's sampler,
  as `LlamaBackend.generate` (L3) does (greedy; the end-of-generation token is not honoured,
  so every run makes exactly the asked number of tokens);
- verify: one teacher-forced prefill of prompt + output with logits at every output position
  (`LlamaBackend._teacher_forced`: the prompt, then the output in blocks of ``--chunk`` rows),
  each block reduced on the host straight from llama.cpp's logits buffer:
  ``greedy`` = `CheckReducer` as a greedy verification asks (argmax, gaps),
  ``sampled`` = `CheckReducer` with top-k 40 and the log-prob floor -20,
  ``full`` = `LlamaBackend.score`'s full log-softmax (the gate's exact log-probs);
  ``prefill`` = the same decodes with no reduction (what the GPU and the copy cost).

Usage (GPU machine; docs/benchmarks.md has the whole recipe):
    python3 bench/bench_verify_gpu.py --write /tmp/models                    # writes the GGUFs
    python3 bench/bench_verify_gpu.py --models /tmp/models --runs 3 --out r.json
Locally (CPU, tiny shape, to check the script): --shapes tiny --gpu-layers 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if "--write" not in sys.argv:  # writing models needs no llama.cpp
    import llama_cpp  # before numpy: the other order segfaulted on the GPU machine

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name: (n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff)
SHAPES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "llama1b": (128256, 2048, 16, 32, 8, 64, 8192),  # Llama 3.2 1B
    "gemma270m": (262144, 640, 18, 4, 1, 256, 2048),  # Gemma 3 270M's dimensions, llama blocks
    "llama8b": (128256, 4096, 32, 32, 8, 128, 14336),  # Llama 3.1 8B
    "tiny": (32000, 256, 4, 4, 2, 64, 512),  # a local smoke test of this script
}


def load_checks() -> Any:
    spec = importlib.util.spec_from_file_location(
        "logit_checks", ROOT / "p2pcache/backend/logit_checks.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["logit_checks"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


def write_model(path: Path, shape: str) -> None:
    import gguf

    n_vocab, n_embd, n_layer, n_head, n_kv, hd, n_ff = SHAPES[shape]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model("llama")
    toks = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    toks += [f"t{i}".encode() for i in range(n_vocab - len(toks))]
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    # One random pool, viewed by every tensor (values do not matter; memory and time do).
    biggest = max(n_vocab * n_embd, n_ff * n_embd, n_head * hd * n_embd)
    pool = (rng.standard_normal(biggest, dtype=np.float32) * 0.02).astype(np.float16)

    def t(*dims: int) -> np.ndarray:
        return pool[: int(np.prod(dims))].reshape(dims)

    ones = np.ones(n_embd, np.float32)
    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))  # tied: also the LM head
    w.add_tensor("output_norm.weight", ones)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", t(n_head * hd, n_embd))
        w.add_tensor(p + "attn_k.weight", t(n_kv * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", t(n_kv * hd, n_embd))
        w.add_tensor(p + "attn_output.weight", t(n_embd, n_head * hd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Bench:
    def __init__(
        self, path: Path, gpu_layers: int, n_ctx: int, n_batch: int, n_ubatch: int
    ) -> None:
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_gpu_layers=gpu_layers,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            flash_attn=True,
            n_threads=min(16, os.cpu_count() or 1),
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.checks = load_checks()
        self.agree: dict[str, float] = {}

    def generate(self, prompt: list[int], n: int, temp: float) -> tuple[list[int], float]:
        """L3's loop (`LlamaBackend.generate`), exactly ``n`` tokens."""
        llm = self.llm
        t0 = time.perf_counter()
        llm.reset()
        llm.set_seed(1)
        sampler = llm._init_sampler(top_k=40, top_p=0.95, min_p=0.05, temp=temp, repeat_penalty=1.0)
        llm.eval(prompt)
        token = sampler.sample(llm._ctx, -1)
        out: list[int] = []
        while True:
            out.append(token)
            if len(out) >= n:
                break
            llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
        return out, time.perf_counter() - t0

    def verify(self, prompt: list[int], completion: list[int], mode: str, chunk: int) -> float:
        """`LlamaBackend._teacher_forced` + the reduction of ``mode``; seconds."""
        llm, V, n = self.llm, self.n_vocab, len(completion)
        t0 = time.perf_counter()
        if mode == "greedy":
            reduce: Any = self.checks.CheckReducer(completion, V)
        elif mode == "sampled":
            reduce = self.checks.CheckReducer(completion, V, top_k=40, logprob_floor=-20.0)
        elif mode == "full":
            reduce = FullScore(completion, V, chunk)
        else:
            reduce = lambda block, at: None  # noqa: E731
        llm.reset()
        if chunk == 0:  # one decode for prompt + output, logits only from the last prompt token on
            batch = prompt + completion[:-1]
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm._batch.set_batch(batch=batch, n_past=0, logits_all=True)
            for j in range(len(prompt) - 1):
                llm._batch.batch.logits[j] = False
            llm._ctx.decode(llm._batch)
            llm.n_tokens = len(batch)
            reduce(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n, V)), 0)
        else:
            llm.eval(prompt)
            reduce(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(1, V)), 0)
        rest = completion[:-1] if chunk else []
        for i in range(0, len(rest), max(chunk, 1)):
            part = rest[i : i + chunk]
            n_past = llm.n_tokens
            llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
            llm._batch.set_batch(batch=part, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past : n_past + len(part)] = part
            llm.n_tokens += len(part)
            logits = llm._ctx.get_logits()  # synchronizes: the rows are on the host after this
            reduce(np.ctypeslib.as_array(logits, shape=(len(part), V)), 1 + i)
        if mode in ("greedy", "sampled"):
            res = reduce.result()
            assert len(res.gaps) == n
            # Greedy outputs: how often the prefill's argmax is the decoded token (a sanity check).
            self.agree[f"{mode}@{chunk}"] = (
                sum(x == y for x, y in zip(res.argmax, completion, strict=False)) / n
            )
        return time.perf_counter() - t0


class FullScore:
    """`LlamaBackend.score`'s reduction (log-softmax of every row), for comparison."""

    def __init__(self, completion: list[int], n_vocab: int, chunk: int) -> None:
        self.tok = np.asarray(completion, np.int64)
        n = len(completion)
        self.lp = np.zeros(n, np.float32)
        self.scratch = np.empty((min(chunk or n, max(n, 1)), n_vocab), np.float32)

    def __call__(self, block: np.ndarray, at: int) -> None:
        k = min(block.shape[0], len(self.tok) - at)
        if k <= 0:
            return
        block = block[:k]
        mx = block.max(axis=1)
        chosen = block[np.arange(k), self.tok[at : at + k]]
        block.argmax(axis=1)
        tmp = self.scratch[:k]
        np.subtract(block, mx[:, None], out=tmp)
        np.exp(tmp, out=tmp)
        self.lp[at : at + k] = chosen - (mx + np.log(tmp.sum(axis=1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", type=Path, help="write the models' GGUFs into this folder and exit")
    ap.add_argument("--models", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--shapes", default="llama1b,gemma270m")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--chunks",
        default="64,512,0",
        help="rows per verification decode; 0: prompt and output in one decode",
    )
    ap.add_argument("--gpu-layers", type=int, default=-1)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    if a.write:
        a.write.mkdir(parents=True, exist_ok=True)
        for s in shapes:
            t0 = time.perf_counter()
            write_model(a.write / f"{s}.gguf", s)
            print(
                f"wrote {s}.gguf ({(a.write / f'{s}.gguf').stat().st_size / 1e9:.2f} GB) "
                f"in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        return
    print("llama.cpp GPU offload:", llama_cpp.llama_supports_gpu_offload(), flush=True)
    sizes = [int(x) for x in a.sizes.split(",")]
    chunks = [int(x) for x in a.chunks.split(",")]
    rows: list[dict[str, Any]] = []
    for s in shapes:
        b = Bench(a.models / f"{s}.gguf", a.gpu_layers, 4096, a.n_batch, a.n_ubatch)
        rng = np.random.default_rng(1)
        for n in sizes:
            for gmode, temp in (("greedy", 0.0), ("sampled", 0.8)):
                gen_s: list[float] = []
                ver: dict[str, list[float]] = {}
                modes = ("prefill", gmode, "full")
                for r in range(a.runs + 1):  # run 0 warms up (CUDA graphs, allocations)
                    prompt = rng.integers(259, b.n_vocab, a.prompt_tokens).tolist()
                    out, g = b.generate(prompt, n, temp)
                    times = {f"{m}@{c}": b.verify(prompt, out, m, c) for c in chunks for m in modes}
                    if r == 0:
                        continue
                    gen_s.append(g)
                    for k, v in times.items():
                        ver.setdefault(k, []).append(v)
                row = {
                    "shape": s,
                    "n_vocab": b.n_vocab,
                    "tokens": n,
                    "mode": gmode,
                    "prompt_tokens": a.prompt_tokens,
                    "generate_ms": 1000 * statistics.median(gen_s),
                    "verify_ms": {k: 1000 * statistics.median(v) for k, v in ver.items()},
                    "argmax_agreement": dict(b.agree),
                }
                rows.append(row)
                g = row["generate_ms"]
                print(
                    f"{s} n_vocab {b.n_vocab} {n} tokens {gmode}: generate {g:.1f} ms; "
                    f"argmax == token in "
                    f"{b.agree}",
                    flush=True,
                )
                for k, v in row["verify_ms"].items():
                    print(
                        f"    verify {k:<14} {v:8.2f} ms   "
                        f"verify/generate {v / g:.4f} (1/{g / v:.0f})",
                        flush=True,
                    )
        b.llm.close()
        del b
    if a.out:
        a.out.write_text(
            json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}, indent=1)
        )


if __name__ == "__main__":
    main()
