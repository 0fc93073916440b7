"""Per-peer reputation: an in-memory view, written behind to LMDB (the store's environment).

Named databases (a tenant of the store's `LmdbEnv`, next to ``entries``/``evict``/``meta``):

- ``rep_peers``:    peer id (utf-8) -> msgpack `PeerRecord`
- ``rep_evidence``: evidence id (sha256 of the evidence bytes) -> evidence bytes

Every record is loaded at open; reads (score, gossip score, bans) answer from memory and
updates change memory at once. Updates happen inside L2 fetches on the event loop, so they
never wait for LMDB: a changed peer is marked dirty and `flush` writes the dirty records (and
new evidence) in one short transaction, every second from `run` (in a worker thread), and when
the flusher is cancelled or the store closes. A crash loses at most the last unflushed second;
each flush is one LMDB transaction, so what is on disk is always a consistent earlier state.

Counters are exponentially decayed with a half-life (default one day) each time they are
read or updated, so old behaviour fades. The score is a smoothed success ratio in (0, 1):
``(1 + s) / (2 + s + W_FAIL*f + W_TIMEOUT*t + W_BAD*b)``; a new peer scores 0.5. A peer is
banned for `ban_seconds` once its score falls under `ban_threshold` after at least one
verified failure; bans are kept in the record (they survive restarts).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import lmdb
import msgpack
import trio

from p2pcache.errors import MissingDatabase
from p2pcache.net.ewma import ewma
from p2pcache.store.lmdb_env import LmdbEnv, Schema, now_ms

log = logging.getLogger(__name__)

W_FAIL = 3.0  # a verified lie weighs three plain errors
W_TIMEOUT = 1.0
W_BAD = 1.0  # protocol violations (bad signature, hash mismatch, malformed)
# Near-tie divergences of greedy answers (`p2pcache.net.verify`) are not lies, but honest
# float noise makes few of them: about one per 90 checked tokens between batched and
# one-token kernels on one CPU (docs/benchmarks.md). Beyond NEAR_TIE_RATE per checked token
# (plus NEAR_TIE_SLACK), each one weighs as a verified lie. (Sampled answers diverge within
# the noise far more often, ~1 in 5-10 tokens here, so they are not counted.)
NEAR_TIE_RATE = 0.05
NEAR_TIE_SLACK = 2.0

SCHEMA = Schema("reputation", ("rep_peers", "rep_evidence"))


@dataclass
class PeerRecord:
    peer_id: str
    successes: float = 0.0
    failures: float = 0.0  # verified failures (wrong output proven by our own prefill)
    timeouts: float = 0.0
    bad: float = 0.0
    near_ties: float = 0.0  # divergences within float noise (not blamed, counted)
    draft_tokens: float = 0.0  # answer tokens checked against the local model's choices
    bytes_in: int = 0
    fetches: int = 0
    latency_ms: float = 0.0  # EWMA of time to first byte
    bandwidth: float = 0.0  # EWMA bytes/s of bodies >= 64 KB
    first_seen: int = field(default_factory=now_ms)
    last_seen: int = 0
    updated_at: int = field(default_factory=now_ms)
    banned_until: int = 0
    ban_reason: str = ""
    evidence: list[str] = field(default_factory=list)  # ids, newest last (bounded)

    def excess_near_ties(self) -> float:
        """Near-ties beyond what honest float noise explains for the tokens checked."""
        return max(0.0, self.near_ties - NEAR_TIE_RATE * self.draft_tokens - NEAR_TIE_SLACK)

    def score(self) -> float:
        return (1.0 + self.successes) / (
            2.0
            + self.successes
            + W_FAIL * (self.failures + self.excess_near_ties())
            + W_TIMEOUT * self.timeouts
            + W_BAD * self.bad
        )

    def banned(self, at_ms: int | None = None) -> bool:
        return self.banned_until > (at_ms if at_ms is not None else now_ms())

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["score"] = round(self.score(), 4)
        d["is_banned"] = self.banned()
        return d

    def copy(self) -> PeerRecord:
        return replace(self, evidence=list(self.evidence))

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes | memoryview | None, peer_id: str) -> PeerRecord:
        """The stored record, or a fresh one when there is none or it is unreadable (an
        unreadable record starts over)."""
        if raw is None:
            return cls(peer_id)
        try:
            d = msgpack.unpackb(raw, raw=False)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        except Exception:
            return cls(peer_id)


@dataclass(frozen=True)
class ReputationConfig:
    half_life_s: float = 86_400.0
    ban_threshold: float = 0.15  # a fresh liar is banned at its 2nd verified failure
    ban_seconds: float = 86_400.0
    max_evidence_per_peer: int = 16
    flush_interval_s: float = 1.0  # how often `run` writes changed records


class Reputation:
    """Reputation of every peer seen, in memory, persisted in ``env`` (write-behind).

    Thread-safe: one lock guards the view; flushes are serialized by a second one so that an
    older snapshot never overwrites a newer one.
    """

    def __init__(self, env: LmdbEnv, config: ReputationConfig | None = None) -> None:
        self.env = env
        self.config = config or ReputationConfig()
        dbs = env.open(SCHEMA)
        self._peers_db = dbs["rep_peers"]
        self._evidence_db = dbs["rep_evidence"]
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._peers: dict[str, PeerRecord] = self._load()
        self._dirty: set[str] = set()
        self._new_evidence: dict[str, bytes] = {}  # id -> bytes, until flushed
        env.on_close(self.flush)

    def _load(self) -> dict[str, PeerRecord]:
        with self.env.begin(db=self._peers_db) as txn:
            return {
                (pid := bytes(k).decode()): PeerRecord.decode(bytes(raw), pid)
                for k, raw in txn.cursor()
            }

    # -- reads (memory only) -----------------------------------------------------------
    def get(self, peer_id: str) -> PeerRecord:
        """A copy of the peer's record, decayed to now (a fresh record for an unknown peer)."""
        with self._lock:
            rec = self._peers.get(peer_id)
            rec = rec.copy() if rec is not None else PeerRecord(peer_id)
        self._decay(rec, now_ms())
        return rec

    def all(self) -> list[PeerRecord]:
        t = now_ms()
        with self._lock:
            out = [rec.copy() for rec in self._peers.values()]
        for rec in out:
            self._decay(rec, t)
        return out

    def score(self, peer_id: str) -> float:
        return self.get(peer_id).score()

    def is_banned(self, peer_id: str) -> bool:
        return self.get(peer_id).banned()

    def gossip_score(self, peer_id: str) -> float:
        """GossipSub application-specific score: banned -1000, else 20 x (score - 0.5)."""
        rec = self.get(peer_id)
        return -1000.0 if rec.banned() else 20.0 * (rec.score() - 0.5)

    def evidence(self, evidence_id: str) -> bytes | None:
        """A stored proof (rarely read: the CLI and the API's reputation view)."""
        with self._lock:
            pending = self._new_evidence.get(evidence_id)
        if pending is not None:
            return pending
        with self.env.begin(db=self._evidence_db) as txn:
            raw = txn.get(bytes.fromhex(evidence_id))
        return bytes(raw) if raw is not None else None

    @property
    def unflushed(self) -> int:
        """Peers changed in memory since the last flush."""
        with self._lock:
            return len(self._dirty)

    # -- updates (memory now, LMDB at the next flush) ------------------------------------
    def record_success(
        self,
        peer_id: str,
        nbytes: int,
        seconds: float,
        ttfb_s: float | None = None,
        draft_tokens: int = 0,
    ) -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.successes += 1
            rec.draft_tokens += draft_tokens
            rec.bytes_in += nbytes
            rec.fetches += 1
            if ttfb_s is not None:
                rec.latency_ms = ewma(rec.latency_ms, ttfb_s * 1000)
            if nbytes >= 65536 and seconds > 0:
                rec.bandwidth = ewma(rec.bandwidth, nbytes / seconds)

        return self._update(peer_id, f)

    def record_timeout(self, peer_id: str) -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.timeouts += 1
            rec.fetches += 1

        return self._update(peer_id, f)

    def record_bad(self, peer_id: str, reason: str = "") -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.bad += 1
            rec.fetches += 1

        return self._update(peer_id, f, reason)

    def record_near_tie(self, peer_id: str, draft_tokens: int) -> PeerRecord:
        """An answer that diverged from the local choice within float noise at its token
        ``draft_tokens - 1``: not a lie, but counted against the honest rate."""

        def f(rec: PeerRecord) -> None:
            rec.near_ties += 1
            rec.draft_tokens += draft_tokens
            rec.fetches += 1

        return self._update(peer_id, f, "near-tie divergences beyond float noise")

    def record_verified_failure(
        self, peer_id: str, evidence: bytes | None, reason: str
    ) -> PeerRecord:
        """A proven lie. ``evidence`` (signed, self-contained) is kept and linked to the peer."""
        evidence_id = hashlib.sha256(evidence).hexdigest() if evidence else None

        def f(rec: PeerRecord) -> None:
            if evidence_id and evidence_id in rec.evidence:
                return  # the same proof counted once, however often it arrives
            rec.failures += 1
            if evidence_id:
                rec.evidence = (rec.evidence + [evidence_id])[-self.config.max_evidence_per_peer :]

        proof = (evidence_id, evidence) if evidence_id and evidence else None
        return self._update(peer_id, f, reason, evidence=proof)

    def ban(self, peer_id: str, reason: str, seconds: float | None = None) -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.banned_until = now_ms() + int(1000 * (seconds or self.config.ban_seconds))
            rec.ban_reason = reason

        return self._update(peer_id, f)

    def seen(self, peer_id: str) -> None:
        self._update(peer_id, lambda rec: None)

    # -- persistence -------------------------------------------------------------------
    def flush(self) -> int:
        """Write the changed records and new evidence in one LMDB transaction (blocking: call
        it from a worker thread while the event loop runs). Returns how many records were
        written. On failure (disk full) they stay dirty for the next flush."""
        with self._flush_lock:
            with self._lock:
                if not self._dirty and not self._new_evidence:
                    return 0
                dirty, self._dirty = self._dirty, set()
                rows = [(pid.encode(), self._peers[pid].encode()) for pid in dirty]
                evidence = dict(self._new_evidence)
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in rows:
                        txn.put(k, v, db=self._peers_db)
                    for eid, blob in evidence.items():
                        txn.put(bytes.fromhex(eid), blob, db=self._evidence_db)
            except lmdb.Error as exc:
                log.warning(
                    "could not write reputation of %d peers (kept for the next flush): %s",
                    len(rows),
                    exc,
                )
                with self._lock:
                    self._dirty |= dirty
                return 0
            with self._lock:
                for eid in evidence:
                    self._new_evidence.pop(eid, None)
            return len(rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: writes changes every `flush_interval_s` in a worker thread (an fsync
        must not stall the event loop), and once more when cancelled."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.config.flush_interval_s)
                if self.unflushed:  # new evidence always comes with a changed peer
                    await trio.to_thread.run_sync(self.flush)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.flush)

    def close(self) -> None:
        """Write what is unflushed. The environment stays open (the store owns it)."""
        self.flush()

    # -- internals ----------------------------------------------------------------------
    def _update(
        self,
        peer_id: str,
        fn: Callable[[PeerRecord], None],
        reason: str = "",
        evidence: tuple[str, bytes] | None = None,
    ) -> PeerRecord:
        t = now_ms()
        with self._lock:
            rec = self._peers.get(peer_id)
            if rec is None:
                rec = self._peers[peer_id] = PeerRecord(peer_id)
            self._decay(rec, t)
            fn(rec)
            rec.last_seen = t
            threshold = self.config.ban_threshold
            blamed = rec.failures > 0 or rec.bad > 0 or rec.excess_near_ties() > 0
            if blamed and rec.score() < threshold and not rec.banned(t):
                rec.banned_until = t + int(1000 * self.config.ban_seconds)
                rec.ban_reason = reason or f"score {rec.score():.3f} under {threshold}"
            self._dirty.add(peer_id)
            if evidence is not None:
                self._new_evidence[evidence[0]] = evidence[1]
            return rec.copy()

    def _decay(self, rec: PeerRecord, t: int) -> None:
        decay_record(rec, t, self.config.half_life_s)


def decay_record(rec: PeerRecord, t: int, half_life_s: float) -> None:
    """Fade the counters to time ``t`` (ms): halved every ``half_life_s``."""
    dt = max(0, t - rec.updated_at) / 1000.0
    if dt > 0:
        f = math.pow(0.5, dt / half_life_s)
        rec.successes *= f
        rec.failures *= f
        rec.timeouts *= f
        rec.bad *= f
        rec.near_ties *= f
        rec.draft_tokens *= f
    rec.updated_at = t


def read_offline(
    store_dir: str | Path, half_life_s: float = ReputationConfig.half_life_s
) -> tuple[list[PeerRecord], dict[str, bytes]]:
    """Every peer record and stored proof of a node's LMDB, read-only (the node may be stopped
    or running: LMDB readers never block its writer). Decayed to now, as a node would show them.
    Raises FileNotFoundError when there is no store at ``store_dir``."""
    with LmdbEnv.open_readonly(store_dir) as env:
        try:
            rep = Reputation(env, ReputationConfig(half_life_s=half_life_s))
        except MissingDatabase:
            return [], {}
        records = rep.all()
        wanted = {e for r in records for e in r.evidence}
        evidence = {eid: raw for eid in wanted if (raw := rep.evidence(eid)) is not None}
        return records, evidence
