"""Prompt embeddings: the records in LMDB, and a FAISS index per model rebuilt from them.

LMDB (the store's `LmdbEnv`, two named databases of our own) is the source of truth:

- ``semantic``:     input_sha256 (32 bytes) -> framed, checksummed msgpack `SemanticRecord`
                    (the FAISS id, the prompt text, the vector, the gate's baseline scores).
- ``semantic_ids``: FAISS id (8 bytes BE) -> input_sha256; ``b"next"`` -> the next free id.

The FAISS index (`IndexIDMap2` over inner product on unit vectors = cosine; flat while small,
HNSW past ``hnsw_threshold``) lives in ``<dir>/<model_hash>.faiss``: a checksummed snapshot
written atomically every ``save_every`` inserts and on close. On open the snapshot is loaded
and caught up with records added after it (ids are allocated in increasing order); a missing,
truncated or corrupt snapshot is rebuilt from LMDB. Records whose cache entry is gone
(evicted, purged) are skipped at search time and dropped from LMDB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import lmdb
import msgpack
import numpy as np

from p2pcache.errors import SnapshotCorrupt  # noqa: F401 - re-exported
from p2pcache.store import CorruptValue, Store
from p2pcache.store.lmdb_env import Counters, Schema, decode_frame, encode_frame, now_ms

log = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"P2PSEMIX1\n"
DEFAULT_HNSW_THRESHOLD = 20_000  # measured: bench/bench_faiss.py, docs/benchmarks.md
_NEXT = b"next"
SCHEMA = Schema("semantic", ("semantic", "semantic_ids"))


@dataclass
class SemanticRecord:
    """What L1 keeps for one cached prompt."""

    input_sha256: str
    model_hash: str
    faiss_id: int
    text: str  # the text that was embedded (the prompt, or the last user message)
    context: str  # sha256 of everything else that must match (chat history, system prompt)
    vector: bytes  # float32 unit vector
    base_logprob: float  # mean log-prob of the gated answer prefix under the original prompt
    base_agreement: float  # fraction of that prefix that is the local argmax there
    gate_tokens: int  # how many answer tokens the baseline scored
    inserted_at: int = field(default_factory=now_ms)

    def vec(self) -> np.ndarray:
        return np.frombuffer(self.vector, dtype=np.float32)

    def encode(self) -> bytes:
        return encode_frame(msgpack.packb(asdict(self), use_bin_type=True))

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> SemanticRecord:
        try:
            return cls(**msgpack.unpackb(decode_frame(raw), raw=False))
        except (TypeError, ValueError, msgpack.ExtraData) as exc:
            raise CorruptValue(f"undecodable semantic record: {exc}") from exc


def _id_key(i: int) -> bytes:
    return i.to_bytes(8, "big")


class SemanticIndex:
    """Embeddings of one model's cached prompts. Thread-safe (one lock around FAISS)."""

    def __init__(
        self,
        store: Store,
        directory: str | Path,
        model_hash: str,
        dim: int,
        hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
        save_every: int = 64,
    ) -> None:
        self.store = store
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_hash = model_hash
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.save_every = save_every
        self.path = self.dir / f"{model_hash}.faiss"
        self.env = store.env
        dbs = self.env.open(SCHEMA)
        self._records = dbs["semantic"]
        self._ids = dbs["semantic_ids"]
        # the next free FAISS id, big-endian like the id keys beside it
        self._id_seq = Counters(self._ids, byteorder="big")
        self._lock = threading.RLock()
        self._unsaved = 0
        self.rebuilt = False  # True when open() had to rebuild from LMDB (for tests and logs)
        self.index, self._snapshot_next = self._load_or_rebuild()

    # -- FAISS -------------------------------------------------------------------------
    def _new_index(self, n: int) -> faiss.Index:
        if n >= self.hnsw_threshold:
            inner = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = 64
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    @property
    def kind(self) -> str:
        inner = faiss.downcast_index(self.index.index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSWFlat) else "flat"

    def _load_or_rebuild(self) -> tuple[faiss.Index, int]:
        try:
            index, next_id = self._read_snapshot()
        except FileNotFoundError:
            log.info("semantic index %s missing: rebuilding from LMDB", self.path.name)
        except (SnapshotCorrupt, RuntimeError, ValueError) as exc:
            log.warning(
                "semantic index %s unreadable (%s): rebuilding from LMDB", self.path.name, exc
            )
        else:
            added = self._catch_up(index, next_id)
            if added:
                log.info("semantic index: %d records added since the snapshot", added)
            return index, next_id
        self.rebuilt = True
        index = self._rebuild()
        self._write_snapshot(index)
        return index, self._next_id()

    def _rebuild(self) -> faiss.Index:
        ids, vecs = [], []
        for rec in self.records():
            ids.append(rec.faiss_id)
            vecs.append(rec.vec())
        index = self._new_index(len(ids))
        if ids:
            index.add_with_ids(np.stack(vecs).astype(np.float32), np.asarray(ids, dtype=np.int64))
        return index

    def _catch_up(self, index: faiss.Index, since: int) -> int:
        ids, vecs = [], []
        for rec in self.records():
            if rec.faiss_id >= since:
                ids.append(rec.faiss_id)
                vecs.append(rec.vec())
        if ids:
            index.add_with_ids(np.stack(vecs).astype(np.float32), np.asarray(ids, dtype=np.int64))
        return len(ids)

    def _read_snapshot(self) -> tuple[faiss.Index, int]:
        data = self.path.read_bytes()
        if not data.startswith(SNAPSHOT_MAGIC):
            raise SnapshotCorrupt("bad magic")
        rest = data[len(SNAPSHOT_MAGIC) :]
        if len(rest) < 4:
            raise SnapshotCorrupt("truncated header")
        hlen = int.from_bytes(rest[:4], "big")
        try:
            header = msgpack.unpackb(rest[4 : 4 + hlen], raw=False)
        except (ValueError, msgpack.ExtraData) as exc:
            raise SnapshotCorrupt(f"bad header: {exc}") from exc
        payload = rest[4 + hlen :]
        if hashlib.blake2b(payload, digest_size=16).digest() != header.get("blake2b"):
            raise SnapshotCorrupt("checksum mismatch")
        if header.get("model_hash") != self.model_hash or header.get("dim") != self.dim:
            raise SnapshotCorrupt("snapshot of another model or dimension")
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        return index, int(header["next_id"])

    def _write_snapshot(self, index: faiss.Index | None = None) -> None:
        with self._lock:
            index = index if index is not None else self.index
            payload = faiss.serialize_index(index).tobytes()
            next_id = self._next_id()
        header = msgpack.packb(
            {
                "model_hash": self.model_hash,
                "dim": self.dim,
                "next_id": next_id,
                "count": index.ntotal,
                "blake2b": hashlib.blake2b(payload, digest_size=16).digest(),
            },
            use_bin_type=True,
        )
        tmp = self.path.with_suffix(".faiss.tmp")
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC + len(header).to_bytes(4, "big") + header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._snapshot_next = next_id
        self._unsaved = 0

    def save(self) -> None:
        self._write_snapshot()

    # -- LMDB records ------------------------------------------------------------------
    def _next_id(self) -> int:
        with self.env.begin() as txn:
            return self._id_seq.get(txn, _NEXT)

    def records(self) -> Iterator[SemanticRecord]:
        """This model's readable records; corrupt ones are dropped."""
        bad: list[bytes] = []
        out: list[SemanticRecord] = []
        with self.env.begin(db=self._records) as txn:
            for k, raw in txn.cursor():
                try:
                    rec = SemanticRecord.decode(raw)
                except CorruptValue:
                    bad.append(bytes(k))
                    continue
                if rec.model_hash == self.model_hash:
                    out.append(rec)
        for k in bad:
            log.error("corrupt semantic record %s dropped", k.hex())
            self._delete_key(k)
        yield from out

    def get(self, input_sha256: str) -> SemanticRecord | None:
        with self.env.begin(db=self._records) as txn:
            raw = txn.get(bytes.fromhex(input_sha256))
        if raw is None:
            return None
        try:
            return SemanticRecord.decode(raw)
        except CorruptValue:
            self._delete_key(bytes.fromhex(input_sha256))
            return None

    def by_id(self, faiss_id: int) -> SemanticRecord | None:
        with self.env.begin(db=self._ids) as txn:
            key = txn.get(_id_key(faiss_id))
        return self.get(bytes(key).hex()) if key is not None else None

    def add(self, rec_fields: dict) -> SemanticRecord:
        """Allocate an id, write the record (one LMDB transaction), add it to FAISS."""
        k = bytes.fromhex(rec_fields["input_sha256"])
        with self._lock:
            old = self.get(rec_fields["input_sha256"])
            if old is not None:
                return old
            try:
                with self.env.begin(write=True) as txn:
                    fid = self._id_seq.get(txn, _NEXT)
                    rec = SemanticRecord(faiss_id=fid, **rec_fields)
                    self._id_seq.set(txn, _NEXT, fid + 1)
                    txn.put(_id_key(fid), k, db=self._ids)
                    txn.put(k, rec.encode(), db=self._records)
            except lmdb.Error as exc:
                raise RuntimeError(f"could not store the semantic record: {exc}") from exc
            self._ensure_kind(self.index.ntotal + 1)
            self.index.add_with_ids(
                rec.vec()[None, :].astype(np.float32), np.asarray([fid], dtype=np.int64)
            )
            self._unsaved += 1
            if self._unsaved >= self.save_every:
                self._write_snapshot()
        return rec

    def _ensure_kind(self, n: int) -> None:
        if self.kind == "flat" and n >= self.hnsw_threshold:
            log.info("semantic index past %d vectors: switching to HNSW", self.hnsw_threshold)
            self.index = self._rebuild()

    def _delete_key(self, k: bytes) -> None:
        try:
            with self.env.begin(write=True) as txn:
                raw = txn.get(k, db=self._records)
                if raw is None:
                    return
                try:
                    fid = SemanticRecord.decode(raw).faiss_id
                    txn.delete(_id_key(fid), db=self._ids)
                except CorruptValue:
                    fid = None
                txn.delete(k, db=self._records)
        except lmdb.Error as exc:
            log.warning("could not drop semantic record %s: %s", k.hex(), exc)
            return
        if fid is not None:
            with self._lock:
                try:
                    self.index.remove_ids(np.asarray([fid], dtype=np.int64))
                except RuntimeError:  # HNSW cannot remove: the id stays, filtered by lookups
                    pass

    def forget(self, input_sha256: str) -> None:
        """Drop the record of an entry that is gone from the store."""
        self._delete_key(bytes.fromhex(input_sha256))

    # -- search ------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int = 4) -> list[tuple[float, SemanticRecord]]:
        """The ``k`` nearest records by cosine similarity, best first."""
        with self._lock:
            if self.index.ntotal == 0:
                return []
            sims, ids = self.index.search(
                vector.reshape(1, -1).astype(np.float32), min(k, self.index.ntotal)
            )
        out = []
        for sim, fid in zip(sims[0].tolist(), ids[0].tolist(), strict=True):
            if fid < 0:
                continue
            rec = self.by_id(int(fid))
            if rec is not None:
                out.append((float(sim), rec))
        return out

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def close(self) -> None:
        if self._unsaved:
            self._write_snapshot()
