"""Which providers to ask, in which order, and whether asking pays at all.

Providers are ordered by reputation score (bucketed to 0.1, so a small difference does not
beat a much faster peer) and then by the expected transfer time (observed latency + size /
observed bandwidth). A `CostModel` tells whether fetching (and checking) a value is faster
than computing it here, from the node's own measured speeds and the peer's history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from p2pcache.net.ads import Provider
from p2pcache.net.ewma import ewma
from p2pcache.net.reputation import PeerRecord

DEFAULT_LATENCY_S = (
    0.01  # a peer we have not measured yet (optimistic: the first fetch measures it)
)
DEFAULT_BANDWIDTH = 50e6  # bytes/s, idem


@dataclass
class CostModel:
    """Fetch or recompute? Compares the expected time to get a value from a peer (latency +
    bytes / bandwidth, from that peer's measured history) plus checking it, against computing
    it here. Local speeds start at the 2-core CPU figures of the docs and follow what this
    node measures: every verification is one prefill of prompt + output, so it measures the
    prefill speed (decode speed stays at the configured figure)."""

    prefill_tps: float = 700.0
    decode_tps: float = 80.0
    restore_bps: float = 1.7e9  # KV state restore (llama_state_seq_set_data)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 8 and seconds > 0:
            self.prefill_tps = ewma(self.prefill_tps, tokens / seconds)

    @staticmethod
    def fetch_s(nbytes: int, rec: PeerRecord) -> float:
        latency = rec.latency_ms / 1000 if rec.latency_ms else DEFAULT_LATENCY_S
        return latency + nbytes / (rec.bandwidth or DEFAULT_BANDWIDTH)

    def decoder_final_pays(
        self, prompt_tokens: int, max_out_tokens: int, nbytes: int, rec: PeerRecord
    ) -> bool:
        """Fetch + verify (one prefill of prompt + output) vs prefill + decode here."""
        out = max(1, min(max_out_tokens, nbytes // 4))  # a token costs >= ~4 bytes on the wire
        fetch_and_verify = self.fetch_s(nbytes, rec) + (prompt_tokens + out) / self.prefill_tps
        compute = prompt_tokens / self.prefill_tps + out / self.decode_tps
        return fetch_and_verify < compute

    def local_s(self, prompt_tokens: int, max_out_tokens: int) -> float:
        """What answering here (L3: prefill the prompt, decode up to ``max_out_tokens``)
        is expected to take: past this, waiting on peers costs more than it can save."""
        return prompt_tokens / self.prefill_tps + max(1, max_out_tokens) / self.decode_tps

    def kv_prefix_pays(self, state_bytes: int, n_tokens: int, rec: PeerRecord) -> bool:
        """A KV state: fetch + restore vs prefilling its tokens here (the docs' break-even)."""
        return (
            self.fetch_s(state_bytes, rec) + state_bytes / self.restore_bps
            < n_tokens / self.prefill_tps
        )

    def snapshot(self) -> dict[str, float]:
        return {"prefill_tps": round(self.prefill_tps, 1), "decode_tps": round(self.decode_tps, 1)}


@dataclass
class Selection:
    """Ranks providers (best first, never ourselves or a banned peer) and holds the cost model
    both the L2 and the KV tier consult (one measured prefill speed for both)."""

    record: Callable[[str], PeerRecord]  # a peer's reputation record (`Reputation.get`)
    self_id: str
    cost: CostModel = field(default_factory=CostModel)

    def ranked(self, providers: Sequence[Provider]) -> list[Provider]:
        out = []
        for p in providers:
            if p.peer_id == self.self_id:
                continue
            rec = self.record(p.peer_id)
            if rec.banned():
                continue
            # Score bucketed to 0.1 and expected time to the millisecond: a few bytes or a slightly
            # better record do not beat a clearly faster peer; ties go by peer id (stable).
            out.append(
                (-round(rec.score(), 1), round(CostModel.fetch_s(p.size, rec), 3), p.peer_id, p)
            )
        out.sort(key=lambda t: t[:3])
        return [t[3] for t in out]
