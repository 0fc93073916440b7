"""Generation that resumes from the longest stored KV prefix and stores new prefix chunks.

Runs on the backend's worker thread (it drives the llama context through `LlamaBackend`'s
KV-state methods); see `KvPrefixCache.generate`. The decode loop is `LlamaBackend`'s own
(`continue_generation`, the loop `generate` runs too), so a request answers the same with or
without a stored prefix: resumed greedy output equals the cold run, token for token (tested).

Why rows and not whole states: Gemma 3's sliding-window layers keep only the last n_swa
positions, so a state saved at position P cannot be cut back to an earlier boundary, and a
whole state per boundary would store the shared prefix again for every request. Instead every
chunk holds the K/V rows of its own tokens for *all* layers; the rows of the windowed layers
are captured while they are still inside the window (a partial, SWA-only state read every
`capture_every` tokens, which the prefill batches are aligned to). A restore to boundary P
assembles a state from chunks 0..P/C-1: all rows for the full-attention layers, the last
n_swa rows for the windowed ones (or all of them when the SWA cache is full-size). See
docs/kv-prefix.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pcache.backend import Generation, LlamaBackend, TokenHook
from p2pcache.keys import SamplingParams
from p2pcache.kv.chain import KvConfig, chunk_hashes
from p2pcache.kv.chunk_store import KvChunkStore, NewChunk
from p2pcache.kv.state_format import (
    Section,
    StateBuffer,
    StateFormatError,
    StateLayout,
    build_state,
    parse_state,
    v_cells,
)
from p2pcache.store import now_ms

log = logging.getLogger(__name__)

GGML_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 8: "q8_0", 30: "bf16"}
GGML_TYPES = {v: k for k, v in GGML_TYPE_NAMES.items()}


@dataclass(frozen=True)
class KvPolicy:
    """Which prefix boundaries get stored.

    Every full chunk of the prompt is offered, up to ``max_store_tokens``; chunks already
    stored cost nothing (dedup by hash). A partial last chunk is never stored: at most
    ``chunk_tokens - 1`` tokens are prefilled again. The next chat turn re-sends this turn's
    prompt, so it restores all of it and prefills only the answer and the new message.

    ``store_generated`` also stores the answer's chunks. Off by default: their K/V were
    computed one token at a time (decode), and llama.cpp's single-token kernels round
    differently from its batched prefill kernels, so a later request resumed from them is
    not bit-identical to its cold run (measured: greedy output diverged after 4 tokens).
    Prompt chunks are always computed by batched prefill, whose rows do not depend on where
    a batch starts, so resuming from them reproduces the cold run exactly (tested).
    """

    chunk_tokens: int = 16
    store_generated: bool = False
    max_store_tokens: int | None = None  # None: the whole context
    enabled: bool = True


@dataclass
class PendingChunks:
    """New chunks captured by a generation, to be written off the model thread."""

    chunks: list[NewChunk] = field(default_factory=list)  # in chain order
    offered_bytes: int = 0  # bytes of every chunk of the prefix, new or already stored
    used_at: int | None = None  # ms: when the request looked up its prefix

    @property
    def new_bytes(self) -> int:
        return sum(len(c.payload) for c in self.chunks)


@dataclass(frozen=True)
class PrefixGeneration:
    generation: Generation
    cached_tokens: int  # prompt tokens restored from stored chunks
    restore_ms: float
    pending: PendingChunks


class KvPrefixCache:
    """KV prefix reuse for one backend. ``enabled`` is False when the model's state layout
    is not one we can cut (then `generate` is plain cold generation)."""

    def __init__(
        self,
        backend: LlamaBackend,
        chunks: KvChunkStore,
        model_hash: str,
        policy: KvPolicy = KvPolicy(),
    ) -> None:
        self.backend = backend
        self.chunks = chunks
        self.policy = policy
        self.buf = StateBuffer()
        self._zeros = np.zeros(0, np.uint8)
        info = backend.kv_cache_info()
        self.n_swa = info.n_swa
        self.swa_full = info.swa_full
        self.n_batch = backend.config.n_batch
        c = policy.chunk_tokens
        if c <= 0 or self.n_batch % c:
            raise ValueError(f"chunk_tokens ({c}) must divide n_batch ({self.n_batch})")
        # Windowed rows must be captured before they leave the window: capture (and align
        # prefill batches) every `capture_every` tokens, a multiple of the chunk size.
        span = min(self.n_batch, self.n_swa) if self.n_swa > 0 else self.n_batch
        self.capture_every = max(c, span // c * c)
        self.enabled = False
        self.layout: StateLayout | None = None
        self.config: KvConfig | None = None
        if policy.enabled:
            try:
                self.layout = self._probe_layout()
                self.enabled = True
            except StateFormatError as exc:
                log.warning("KV prefix cache disabled for this model: %s", exc)
        if self.layout is not None:
            self.config = KvConfig(
                model_hash=model_hash,
                chunk_tokens=c,
                type_k=GGML_TYPE_NAMES.get(info.type_k, str(info.type_k)),
                type_v=GGML_TYPE_NAMES.get(info.type_v, str(info.type_v)),
                flash_attn=bool(backend.config.flash_attn),
                n_batch=self.n_batch,
                n_swa=self.n_swa,
                layout=tuple(self.layout.describe()),
            )
        self.chunk_bytes = c * self.layout.token_bytes if self.layout else 0

    # -- layout --------------------------------------------------------------------------
    def _probe_layout(self) -> StateLayout:
        """Evaluate one token and read the state back: the layout llama.cpp writes for this
        model and context (cache count, layer types, V transposed or not)."""
        backend = self.backend
        backend.reset()
        backend.prefill([backend.bos_token])
        layout, sections = parse_state(backend.read_state(self.buf))
        backend.clear_memory()
        want = 2 if self.n_swa > 0 else 1
        if len(sections) != want:
            raise StateFormatError(
                f"{len(sections)} KV caches for n_swa={self.n_swa} (expected {want})"
            )
        return layout

    # -- restore -------------------------------------------------------------------------
    def _restore(self, payloads: list[memoryview]) -> bool:
        """Assemble a state for boundary len(payloads) * C and load it into sequence 0."""
        assert self.layout is not None
        c = self.policy.chunk_tokens
        n_tok = len(payloads) * c
        chunks = [self._split_payload(p) for p in payloads]
        positions: list[np.ndarray] = []
        rows: list[list[tuple[list[np.ndarray], list[np.ndarray]]]] = []
        for s, sec in enumerate(self.layout.sections):
            # With a full-size SWA cache (llama-cpp-python's default) a cold context keeps
            # every position in the SWA cache too, at cell == position, and masks the old
            # ones. Restoring the same cells gives the same cell layout, so attention sums in
            # the same order and the resumed run is bit-identical to the cold one. (Only the
            # window would be smaller, but its cells would be relocated, and the changed
            # summation order can flip a greedy token: measured.) The cells before the window
            # are masked for every later query (weight exactly 0), so their K/V values never
            # reach a result: they are written as zeros instead of being copied from chunks
            # (at 4k tokens that skips ~70% of the bytes; still bit-identical, tested).
            swa = s == 1 and self.n_swa > 0
            first = max(0, n_tok - self.n_swa) if swa else 0
            zeros = first if swa and self.swa_full else 0
            c0 = first // c
            skip = first - c0 * c
            positions.append(np.arange(first - zeros, n_tok, dtype=np.int32))
            sec_rows = []
            for li, layer in enumerate(sec.layers):
                ks = [ch[s][li][0] for ch in chunks[c0:]]
                vs = [ch[s][li][1] for ch in chunks[c0:]]
                if skip:  # a window that does not start at a chunk boundary
                    ks[0] = ks[0][skip:]
                    vs[0] = v_cells(sec.v_trans, vs[0], skip, c)
                if zeros:
                    ks.insert(0, self._zero_rows(zeros, layer.k_row))
                    if sec.v_trans:
                        vs.insert(
                            0,
                            self._zero_rows(zeros, layer.v_row).reshape(
                                layer.v_row // layer.v_el, zeros, layer.v_el
                            ),
                        )
                    else:
                        vs.insert(0, self._zero_rows(zeros, layer.v_row))
                sec_rows.append((ks, vs))
            rows.append(sec_rows)
        size = build_state(self.layout, positions, rows, self.buf)
        if not self.backend.load_state(self.buf, size):
            log.error("llama.cpp refused a rebuilt KV state (%d bytes); prefilling instead", size)
            return False
        return True

    def _zero_rows(self, cells: int, row: int) -> np.ndarray:
        """(cells, row) zero bytes: a view of one shared, lazily grown zero array."""
        if self._zeros.size < cells * row:
            self._zeros = np.zeros(cells * row, np.uint8)
        return self._zeros[: cells * row].reshape(cells, row)

    def _split_payload(self, payload: memoryview) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """A chunk payload as [section][layer] -> (K rows, V rows or transposed V block) views."""
        assert self.layout is not None
        c = self.policy.chunk_tokens
        off = 0
        out = []
        for sec in self.layout.sections:
            layers = []
            for layer in sec.layers:
                k = np.frombuffer(payload, np.uint8, c * layer.k_row, off).reshape(c, layer.k_row)
                off += c * layer.k_row
                v = np.frombuffer(payload, np.uint8, c * layer.v_row, off)
                if sec.v_trans:
                    v = v.reshape(layer.v_row // layer.v_el, c, layer.v_el)
                else:
                    v = v.reshape(c, layer.v_row)
                off += c * layer.v_row
                layers.append((k, v))
            out.append(layers)
        return out

    # -- capture -------------------------------------------------------------------------
    def _capture_window(self, want: set[int], got: dict[int, list[tuple[bytes, bytes]]]) -> None:
        """Copy the windowed layers' rows of wanted chunks that are complete and inside the
        window now (a partial state read: only the SWA cache, a few MB)."""
        c = self.policy.chunk_tokens
        n_now = self.backend.n_tokens
        todo = [i for i in want if i not in got and (i + 1) * c <= n_now]
        if not todo:
            return
        _, (sec,) = parse_state(self.backend.read_state(self.buf, swa_only=True), n_sections=1)
        self._take_rows(sec, todo, got)

    def _take_rows(
        self, sec: Section, todo: list[int], got: dict[int, list[tuple[bytes, bytes]]]
    ) -> None:
        c = self.policy.chunk_tokens
        if not len(sec.positions):
            return
        lo, hi = int(sec.positions[0]), int(sec.positions[-1]) + 1
        if hi - lo != len(sec.positions):  # not one contiguous run of positions: take nothing
            return
        v_trans = self.layout.sections[-1].v_trans if self.layout else False
        for i in todo:
            a, b = i * c, (i + 1) * c
            if a >= lo and b <= hi:
                got[i] = [
                    (k[a - lo : b - lo].tobytes(), v_cells(v_trans, v, a - lo, b - lo).tobytes())
                    for k, v in zip(sec.k, sec.v, strict=True)
                ]

    def _collect(
        self,
        tokens: list[int],
        used_at: int,
        swa_rows: dict[int, list[tuple[bytes, bytes]]],
        want: set[int],
    ) -> PendingChunks:
        """After generation: the full state gives every row of the full-attention layers;
        windowed rows come from the captures (or the final window)."""
        assert self.layout is not None and self.config is not None
        c = self.policy.chunk_tokens
        n_chunks = len(tokens) // c
        hashes = chunk_hashes(self.config, tokens, n_chunks)
        pending = PendingChunks(offered_bytes=n_chunks * self.chunk_bytes, used_at=used_at)
        if not want:
            return pending
        _, sections = parse_state(
            self.backend.read_state(self.buf), n_sections=len(self.layout.sections)
        )
        base = sections[0]
        if len(base.positions) < n_chunks * c or np.any(
            base.positions[: n_chunks * c] != np.arange(n_chunks * c)
        ):
            log.warning(
                "KV state does not hold positions 0..%d in order; not storing", n_chunks * c
            )
            return pending
        if len(sections) == 2:
            self._take_rows(sections[1], [i for i in want if i not in swa_rows], swa_rows)
        for i in sorted(want):
            if i >= n_chunks:
                continue
            parts: list[bytes] = []
            a, b = i * c, (i + 1) * c
            v_trans = self.layout.sections[0].v_trans
            for k, v in zip(base.k, base.v, strict=True):
                parts += [k[a:b].tobytes(), v_cells(v_trans, v, a, b).tobytes()]
            if len(sections) == 2:
                if i not in swa_rows:
                    log.warning("windowed rows of chunk %d were not captured; not storing it", i)
                    continue
                for k_b, v_b in swa_rows[i]:
                    parts += [k_b, v_b]
            pending.chunks.append(NewChunk(hashes[i], i, c, b"".join(parts)))
        return pending

    # -- generation ------------------------------------------------------------------------
    def generate(
        self, prompt: Sequence[int], params: SamplingParams, on_token: TokenHook | None = None
    ) -> PrefixGeneration:
        """``on_token``: as in `LlamaBackend.generate` (each token as it is sampled)."""
        backend = self.backend
        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        backend.check_fits(len(prompt), params.max_tokens)
        if not self.enabled or self.config is None:
            return PrefixGeneration(
                backend.generate(prompt, params, on_token), 0, 0.0, PendingChunks()
            )
        c = self.policy.chunk_tokens
        t0 = time.perf_counter()
        used_at = now_ms()
        # Restore: the longest stored prefix that leaves at least one token to evaluate
        # (its logits give the first output token).
        start = self._restore_prefix(prompt, (len(prompt) - 1) // c)
        n_restored = start // c
        t_restored = time.perf_counter()
        self.chunks.count_lookup(len(prompt), start)

        # Chunks this request may add (policy), minus those already stored.
        limit = self.policy.max_store_tokens or backend.config.n_ctx
        max_chunk = (
            min(limit, len(prompt) + (params.max_tokens if self.policy.store_generated else 0)) // c
        )
        candidates = list(range(n_restored, max_chunk))
        prompt_hashes = chunk_hashes(self.config, prompt, len(prompt) // c)
        known = self.chunks.present(
            [prompt_hashes[i] for i in candidates if i < len(prompt_hashes)]
        )
        # ``known`` covers the prompt's chunks only (the first candidates); the answer's
        # chunks (past the prompt) are always wanted.
        want = {i for i, k in zip(candidates, known, strict=False) if not k} | {
            i for i in candidates if i >= len(prompt_hashes)
        }
        swa_rows: dict[int, list[tuple[bytes, bytes]]] = {}
        windowed = len(self.layout.sections) == 2 if self.layout else False
        a = self.capture_every

        def capture(n_tokens: int) -> None:
            # Windowed rows leave the window as positions advance: take them at each multiple
            # of capture_every (where the prefill batches end, and during decode).
            if n_tokens % a == 0:
                self._capture_window(want, swa_rows)

        gen = backend.continue_generation(
            prompt,
            params,
            on_token,
            align=a,
            on_evaluated=capture if windowed and want else None,
            started=t0,
        )
        evaluated = backend.evaluated()
        if not self.policy.store_generated:
            evaluated = evaluated[: len(prompt)]
        evaluated = evaluated[: (limit // c) * c]
        try:
            pending = self._collect(evaluated, used_at, swa_rows, want)
        except StateFormatError as exc:
            log.warning("could not capture KV chunks: %s", exc)
            pending = PendingChunks()
        return PrefixGeneration(gen, start, (t_restored - t0) * 1000, pending)

    def _restore_prefix(self, tokens: Sequence[int], max_chunks: int) -> int:
        """Load the longest stored prefix of ``tokens`` (at most ``max_chunks`` chunks) into
        the context, or empty it when there is none; returns the positions it now holds."""
        assert self.config is not None
        c = self.policy.chunk_tokens
        hashes = chunk_hashes(self.config, tokens, max_chunks)
        n_restored = 0
        if hashes:
            n, ok = self.chunks.read_prefix(hashes, self.chunk_bytes, self._restore)
            n_restored = n if ok else 0
        start = n_restored * c
        if start:
            self.backend.resume(tokens[:start])
        else:
            self.backend.clear_memory()
        return start

    # -- spot-check ------------------------------------------------------------------------
    def spot_check(self, tokens: Sequence[int], n_chunks: int) -> float | None:
        """Max |logit difference| after the first ``n_chunks`` stored chunks of ``tokens``
        (and the prompt up to the next capture boundary) vs a cold prefill of the same tokens
        (inf: NaN or inf logits). Checks chunks fetched from a peer; on the same hardware good
        chunks give identical logits. None: the prefix could not be restored from the local
        store (a chunk evicted meanwhile, or not stored for the cap): nothing to blame.
        Runs the model: call it on the backend's worker thread."""
        start = n_chunks * self.policy.chunk_tokens
        upto = min(len(tokens), (start // self.capture_every + 1) * self.capture_every)
        head = list(tokens[:upto])
        restored = self._next_logits(head, n_chunks)
        if restored is None:
            return None
        cold = self._next_logits(head, 0)
        assert cold is not None
        diff = float(np.max(np.abs(restored - cold)))
        return diff if np.isfinite(diff) else float("inf")

    def _next_logits(self, tokens: list[int], n_chunks: int) -> np.ndarray | None:
        """Logits after ``tokens``, starting from exactly the first ``n_chunks`` stored chunks
        (0: a cold prefill), prefilled in `generate`'s aligned batches."""
        if n_chunks:
            if self._restore_prefix(tokens, n_chunks) != n_chunks * self.policy.chunk_tokens:
                return None
        else:
            self.backend.clear_memory()
        self.backend.prefill(tokens, align=self.capture_every)
        return self.backend.last_logits()

    def store(self, pending: PendingChunks) -> int:
        """Write captured chunks (blocking LMDB write: call off the event loop)."""
        if not pending.chunks and not pending.offered_bytes:
            self.chunks.flush()
            return 0
        return self.chunks.put_many(pending.chunks, pending.offered_bytes, pending.used_at)


def kv_backend_options(kv_type: str) -> dict[str, object]:
    """BackendConfig fields for a KV element type ("f16", "q8_0", "q4_0"). Quantized V needs
    llama.cpp's flash attention, so it turns that on (and kv_config records it)."""
    if kv_type not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"unknown KV type {kv_type!r} (f16, q8_0 or q4_0)")
    if kv_type == "f16":
        return {}
    t = GGML_TYPES[kv_type]
    return {"type_k": t, "type_v": t, "flash_attn": True}
