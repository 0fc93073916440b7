"""What the node believes about each peer, and why: reputation, evidence, bans.

Fetch outcomes update the `Reputation` (`fetched`, `fetch_failed`, `convict`). A proven lie
is published as signed evidence on the model's evidence topic; evidence from others is
re-verified on our own model before we act on it (a false accusation costs the accuser);
evidence from a banned accuser is dropped before any model work. A ban drops the peer's
adverts and closes its connection (the ``on_ban`` callbacks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.peer.id import ID

from p2pcache.identity import Identity
from p2pcache.net.evidence import (
    EvidenceRejected,
    decode_evidence,
    describe_evidence,
    evidence_topic,
    make_evidence,
)
from p2pcache.net.fetch import BadResponse, Busy, FetchError, NotFound
from p2pcache.net.gossip import Gossip
from p2pcache.net.parts import Proof, Verifier
from p2pcache.net.reputation import PeerRecord, Reputation

log = logging.getLogger(__name__)

EVIDENCE_QUEUE = 64  # received evidence waiting to be re-verified; more is dropped


class Trust:
    """The `Judge` of the tiers, the evidence topic's validator and checker, and the bans."""

    def __init__(
        self,
        identity: Identity,
        model_hash: str,
        rep: Reputation,
        verifier: Verifier | None,
        on_ban: Sequence[Callable[[str], None]] = (),
    ) -> None:
        self.identity = identity
        self.model_hash = model_hash
        self.rep = rep
        self.verifier = verifier  # None: evidence from others is not checked (no model here)
        self.topic = evidence_topic(model_hash)
        self._on_ban = tuple(on_ban)
        self.stats = {
            "accepted": 0,
            "rejected": 0,
            "confirmed": 0,
            "refuted": 0,
            "unconfirmed": 0,
            "checked": 0,  # re-verified on the model
            "skipped_banned": 0,  # queued, then dropped unchecked: accuser or liar banned
        }
        self._send, self._recv = trio.open_memory_channel[bytes](EVIDENCE_QUEUE)
        self._gossip: Gossip | None = None

    # -- what fetches say (the tiers' Judge) ------------------------------------------------
    def record(self, peer_id: str) -> PeerRecord:
        return self.rep.get(peer_id)

    def gossip_score(self, peer_id: str) -> float:
        """What GossipSub adds to its own score of the peer (a banned peer leaves the mesh)."""
        return self.rep.gossip_score(peer_id)

    def fetched(
        self,
        peer_id: str,
        nbytes: int,
        seconds: float,
        ttfb_s: float | None = None,
        draft_tokens: int = 0,
    ) -> None:
        self.rep.record_success(peer_id, nbytes, seconds, ttfb_s, draft_tokens)

    def near_tie(self, peer_id: str, draft_tokens: int) -> None:
        rec = self.rep.record_near_tie(peer_id, draft_tokens)
        if rec.banned():
            log.warning("%s banned: %s", peer_id[:16], rec.ban_reason)
            self.banned(peer_id)

    def fetch_failed(self, peer_id: str, exc: FetchError) -> bool:
        """not_found (a stale advert) and busy say nothing against the peer; a malformed or
        badly signed response is bad; anything else (timeout, unreachable, vanished
        mid-transfer, reset) counts as a timeout."""
        if isinstance(exc, (NotFound, Busy)):
            return False
        if isinstance(exc, BadResponse):
            log.warning("bad response from %s: %s", peer_id[:16], exc)
            self.rep.record_bad(peer_id, str(exc))
        else:
            log.info("fetch from %s failed: %s", peer_id[:16], exc)
            self.rep.record_timeout(peer_id)
        return True

    async def convict(self, peer_id: str, reason: str, proof: Proof | None = None) -> None:
        data = None
        if proof is not None:
            data = make_evidence(
                self.identity, proof.got.header, proof.got.body, proof.prompt, proof.params, reason
            ).encode()
        rec = self.rep.record_verified_failure(peer_id, data, reason)
        if data is not None:
            await self.publish_evidence(data)
        if rec.banned():
            self.banned(peer_id)

    def banned(self, peer_id: str) -> None:
        """A banned peer's adverts are dropped and its connection closed (it may not redial:
        the fetch server and the ad validator refuse it while the ban lasts)."""
        for callback in self._on_ban:
            callback(peer_id)

    # -- the admin views ----------------------------------------------------------------------
    def reputation(self, peer_id: str | None = None) -> list[dict[str, Any]]:
        """Every known peer (or one): score, counts, last seen, ban state, evidence. With
        ``peer_id`` the evidence ids are expanded into what each proof says."""
        if peer_id is None:
            return [{**r.to_dict(), "banned": r.banned()} for r in self.rep.all()]
        rec = self.rep.get(peer_id)
        return [
            {
                **rec.to_dict(),
                "banned": rec.banned(),
                "evidence_detail": [describe_evidence(self.rep, e) for e in rec.evidence],
            }
        ]

    # -- evidence gossip --------------------------------------------------------------------
    async def publish_evidence(self, data: bytes) -> None:
        if self._gossip is None:
            return
        try:
            await self._gossip.publish(self.topic, data)
        except Exception as exc:
            log.warning("could not publish evidence: %r", exc)

    def validate_evidence(self, forwarder: object, msg: Any) -> bool:
        """The evidence topic's validator: static checks only, the model runs later."""
        try:
            ev = decode_evidence(bytes(msg.data), self.model_hash)
            if ID(msg.from_id).to_base58() != ev.accuser:
                raise EvidenceRejected("origin is not the accuser")
            # A banned accuser's word is worth nothing here and must cost nothing: dropped
            # (and not forwarded) before it can reach the model queue.
            if self.rep.is_banned(ev.accuser):
                raise EvidenceRejected(f"accuser {ev.accuser[:16]} is banned")
        except Exception as exc:  # never let a hostile message crash the pubsub loop
            self.stats["rejected"] += 1
            log.info("evidence rejected: %s", exc)
            return False
        self.stats["accepted"] += 1
        if ev.accuser != self.identity.peer_id:
            try:
                self._send.send_nowait(bytes(msg.data))
            except trio.WouldBlock:
                log.warning("evidence queue full; dropped one")
        return True

    async def _check_evidence(self) -> None:
        """Re-verify received evidence on our own model before acting on it."""
        async for data in self._recv:
            try:
                ev = decode_evidence(data, self.model_hash)
                if self.verifier is None:
                    continue
                # Re-checked right before the model runs: a ban may have come while it queued.
                # A banned accuser gets no model time; a banned liar needs none (nothing to
                # learn).
                if self.rep.is_banned(ev.accuser) or self.rep.is_banned(ev.liar):
                    self.stats["skipped_banned"] += 1
                    continue
                self.stats["checked"] += 1
                verdict = await self.verifier.verify(
                    ev.entry(), ev.header.key, list(ev.prompt), ev.sampling_params(), tail=False
                )
            except Exception as exc:
                log.warning("evidence could not be checked: %r", exc)
                continue
            if verdict.ok:  # the accused answer is right: the accuser lied
                self.stats["refuted"] += 1
                self.rep.record_bad(ev.accuser, "false accusation")
                log.warning(
                    "evidence from %s refuted: %s is innocent", ev.accuser[:16], ev.liar[:16]
                )
            elif not verdict.blamed:
                # Within float noise here: neither side is blamed on our own model's word.
                self.stats["unconfirmed"] += 1
                log.info("evidence from %s not confirmed: %s", ev.accuser[:16], verdict.reason)
            else:
                self.stats["confirmed"] += 1
                rec = self.rep.record_verified_failure(
                    ev.liar, data, f"evidence from {ev.accuser[:16]}: {verdict.reason}"
                )
                if rec.banned():
                    self.banned(ev.liar)
                log.warning("evidence confirmed: %s lied (%s)", ev.liar[:16], verdict.reason)

    async def run(
        self, gossip: Gossip, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Until cancelled: publish evidence on ``gossip``, check what arrives, and write the
        reputation behind (`Reputation.run`)."""
        self._gossip = gossip
        try:
            async with trio.open_nursery() as nursery:
                # Writes reputation off the loop, and once more (shielded) when cancelled.
                nursery.start_soon(self.rep.run)
                nursery.start_soon(self._check_evidence)
                task_status.started()
        finally:
            self._gossip = None
