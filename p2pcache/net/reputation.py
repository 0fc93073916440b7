"""Per-peer reputation in LMDB, in the same environment as the entry store.

Named databases (next to the store's ``entries``/``evict``/``meta``):

- ``rep_peers``:    peer id (utf-8) -> msgpack `PeerRecord`
- ``rep_evidence``: evidence id (sha256 of the evidence bytes) -> evidence bytes

Counters are exponentially decayed with a half-life (default one day) each time they are
read or updated, so old behaviour fades. The score is a smoothed success ratio in (0, 1):
``(1 + s) / (2 + s + W_FAIL*f + W_TIMEOUT*t + W_BAD*b)``; a new peer scores 0.5. A peer is
banned for `ban_seconds` once its score falls under `ban_threshold` after at least one
verified failure; bans are kept in the record (they survive restarts).
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import lmdb
import msgpack

from p2pcache.store.records import now_ms

W_FAIL = 3.0  # a verified lie weighs three plain errors
W_TIMEOUT = 1.0
W_BAD = 1.0  # protocol violations (bad signature, hash mismatch, malformed)


@dataclass
class PeerRecord:
    peer_id: str
    successes: float = 0.0
    failures: float = 0.0  # verified failures (wrong output proven by our own prefill)
    timeouts: float = 0.0
    bad: float = 0.0
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

    def score(self) -> float:
        return (1.0 + self.successes) / (
            2.0 + self.successes + W_FAIL * self.failures + W_TIMEOUT * self.timeouts + W_BAD * self.bad
        )

    def banned(self, at_ms: int | None = None) -> bool:
        return self.banned_until > (at_ms if at_ms is not None else now_ms())

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["score"] = round(self.score(), 4)
        d["is_banned"] = self.banned()
        return d


@dataclass(frozen=True)
class ReputationConfig:
    half_life_s: float = 86_400.0
    ban_threshold: float = 0.15  # a fresh liar is banned at its 2nd verified failure
    ban_seconds: float = 86_400.0
    max_evidence_per_peer: int = 16


class Reputation:
    def __init__(self, env: lmdb.Environment, config: ReputationConfig | None = None) -> None:
        self.env = env
        self.config = config or ReputationConfig()
        self._peers = env.open_db(b"rep_peers")
        self._evidence = env.open_db(b"rep_evidence")
        self._lock = threading.Lock()

    # -- reads ------------------------------------------------------------------------
    def get(self, peer_id: str) -> PeerRecord:
        with self.env.begin(db=self._peers) as txn:
            raw = txn.get(peer_id.encode())
        rec = self._decode(raw, peer_id)
        self._decay(rec, now_ms())
        return rec

    def all(self) -> list[PeerRecord]:
        out = []
        t = now_ms()
        with self.env.begin(db=self._peers) as txn:
            for k, raw in txn.cursor():
                rec = self._decode(bytes(raw), bytes(k).decode())
                self._decay(rec, t)
                out.append(rec)
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
        with self.env.begin(db=self._evidence) as txn:
            raw = txn.get(bytes.fromhex(evidence_id))
        return bytes(raw) if raw is not None else None

    # -- updates ------------------------------------------------------------------------
    def record_success(self, peer_id: str, nbytes: int, seconds: float, ttfb_s: float | None = None) -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.successes += 1
            rec.bytes_in += nbytes
            rec.fetches += 1
            if ttfb_s is not None:
                rec.latency_ms = _ewma(rec.latency_ms, ttfb_s * 1000)
            if nbytes >= 65536 and seconds > 0:
                rec.bandwidth = _ewma(rec.bandwidth, nbytes / seconds)
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

    def record_verified_failure(self, peer_id: str, evidence: bytes | None, reason: str) -> PeerRecord:
        """A proven lie. ``evidence`` (signed, self-contained) is kept and linked to the peer."""
        evidence_id = hashlib.sha256(evidence).hexdigest() if evidence else None

        def f(rec: PeerRecord) -> None:
            if evidence_id and evidence_id in rec.evidence:
                return  # the same proof counted once, however often it arrives
            rec.failures += 1
            if evidence_id:
                rec.evidence = (rec.evidence + [evidence_id])[-self.config.max_evidence_per_peer:]
        return self._update(peer_id, f, reason, evidence=(evidence_id, evidence) if evidence_id else None)

    def ban(self, peer_id: str, reason: str, seconds: float | None = None) -> PeerRecord:
        def f(rec: PeerRecord) -> None:
            rec.banned_until = now_ms() + int(1000 * (seconds or self.config.ban_seconds))
            rec.ban_reason = reason
        return self._update(peer_id, f)

    def seen(self, peer_id: str) -> None:
        self._update(peer_id, lambda rec: None)

    # -- internals ----------------------------------------------------------------------
    def _update(self, peer_id: str, fn, reason: str = "", evidence: tuple[str, bytes] | None = None) -> PeerRecord:  # noqa: ANN001
        k = peer_id.encode()
        t = now_ms()
        with self._lock, self.env.begin(write=True) as txn:
            rec = self._decode(txn.get(k, db=self._peers), peer_id)
            self._decay(rec, t)
            fn(rec)
            rec.last_seen = t
            if (rec.failures > 0 or rec.bad > 0) and rec.score() < self.config.ban_threshold and not rec.banned(t):
                rec.banned_until = t + int(1000 * self.config.ban_seconds)
                rec.ban_reason = reason or f"score {rec.score():.3f} under {self.config.ban_threshold}"
            txn.put(k, msgpack.packb(asdict(rec), use_bin_type=True), db=self._peers)
            if evidence is not None:
                txn.put(bytes.fromhex(evidence[0]), evidence[1], db=self._evidence)
        return rec

    def _decay(self, rec: PeerRecord, t: int) -> None:
        decay_record(rec, t, self.config.half_life_s)

    @staticmethod
    def _decode(raw: bytes | None, peer_id: str) -> PeerRecord:
        if raw is None:
            return PeerRecord(peer_id)
        try:
            d = msgpack.unpackb(raw, raw=False)
            known = {f.name for f in fields(PeerRecord)}
            return PeerRecord(**{k: v for k, v in d.items() if k in known})
        except Exception:
            return PeerRecord(peer_id)  # an unreadable record starts over


def decay_record(rec: PeerRecord, t: int, half_life_s: float) -> None:
    """Fade the counters to time ``t`` (ms): halved every ``half_life_s``."""
    dt = max(0, t - rec.updated_at) / 1000.0
    if dt > 0:
        f = math.pow(0.5, dt / half_life_s)
        rec.successes *= f
        rec.failures *= f
        rec.timeouts *= f
        rec.bad *= f
    rec.updated_at = t


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new


def read_offline(store_dir: str | Path, half_life_s: float = ReputationConfig.half_life_s
                 ) -> tuple[list[PeerRecord], dict[str, bytes]]:
    """Every peer record and stored proof of a node's LMDB, read-only (the node may be stopped
    or running: LMDB readers never block its writer). Decayed to now, as a node would show them."""
    path = Path(store_dir)
    if not (path / "data.mdb").exists():
        raise FileNotFoundError(f"no store at {path}")
    env = lmdb.open(str(path), readonly=True, max_dbs=16, lock=True, readahead=False)
    try:
        try:
            peers_db = env.open_db(b"rep_peers", create=False)
        except lmdb.NotFoundError:
            return [], {}
        t = now_ms()
        records = []
        with env.begin(db=peers_db) as txn:
            for k, raw in txn.cursor():
                rec = Reputation._decode(bytes(raw), bytes(k).decode())
                decay_record(rec, t, half_life_s)
                records.append(rec)
        evidence: dict[str, bytes] = {}
        try:
            ev_db = env.open_db(b"rep_evidence", create=False)
        except lmdb.NotFoundError:
            return records, evidence
        wanted = {e for r in records for e in r.evidence}
        with env.begin(db=ev_db) as txn:
            for eid in wanted:
                raw = txn.get(bytes.fromhex(eid))
                if raw is not None:
                    evidence[eid] = bytes(raw)
        return records, evidence
    finally:
        env.close()
