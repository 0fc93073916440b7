"""Signed evidence of a verified failure, published on ``otd/1/evidence/<model_hash>``.

The evidence is self-contained: the liar's own signed fetch response (header + body), the
prompt tokens and sampling params (so anyone can recompute the key), the accuser's reason,
all signed by the accuser. A receiver checks every signature and hash statically in the topic
validator (the response's signed key must be the prompt's key; the entry in the body may name
another key: serving an entry made for another key is one of the lies), then re-runs the
teacher-forced verification on its own model before acting: confirmed -> a verified failure
for the liar; refuted -> a bad mark for the accuser (a false accusation costs the accuser).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pcache.errors import EvidenceRejected  # noqa: F401 - re-exported
from p2pcache.identity import Identity
from p2pcache.keys import SamplingParams, input_sha256
from p2pcache.net.fetch import BadResponse, ResponseHeader, entry_from_wire
from p2pcache.net.peer_keys import canonical, verify_by_peer
from p2pcache.store import Entry, now_ms

EVIDENCE_VERSION = 1
MAX_EVIDENCE_BYTES = 1024 * 1024


def evidence_topic(model_hash: str) -> str:
    return f"otd/1/evidence/{model_hash}"


@dataclass(frozen=True)
class Evidence:
    model_hash: str
    accuser: str
    ts: int
    header: ResponseHeader
    body: bytes
    prompt: tuple[int, ...]
    params: dict[str, Any]
    reason: str
    sig: bytes = b""

    @property
    def liar(self) -> str:
        return self.header.server

    def payload(self) -> bytes:
        return canonical(
            b"otd-evidence-v1",
            self.model_hash,
            self.accuser,
            self.ts,
            self.header.to_msg(),
            self.body,
            list(self.prompt),
            self.params,
            self.reason,
        )

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": EVIDENCE_VERSION,
                "model_hash": self.model_hash,
                "accuser": self.accuser,
                "ts": self.ts,
                "header": self.header.to_msg(),
                "body": self.body,
                "prompt": list(self.prompt),
                "params": self.params,
                "reason": self.reason,
                "sig": self.sig,
            },
            use_bin_type=True,
        )

    def entry(self) -> Entry:
        return entry_from_wire(self.body)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams.from_dict(self.params)


def make_evidence(
    identity: Identity,
    header: ResponseHeader,
    body: bytes,
    prompt: Sequence[int],
    params: SamplingParams,
    reason: str,
) -> Evidence:
    ev = Evidence(
        header.model_hash,
        identity.peer_id,
        now_ms(),
        header,
        bytes(body),
        tuple(int(t) for t in prompt),
        params.to_dict(),
        reason[:200],
    )
    return Evidence(**{**ev.__dict__, "sig": identity.sign(ev.payload())})


def describe_evidence(rep: Any, evidence_id: str) -> dict[str, Any]:
    """What a stored proof says, for the reputation CLI (``rep``: a `Reputation`)."""
    raw = rep.evidence(evidence_id)
    if raw is None:
        return {"id": evidence_id, "missing": True}
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        return {
            "id": evidence_id,
            "accuser": str(m["accuser"]),
            "liar": str(m["header"]["server"]),
            "key": str(m["header"]["key"]),
            "reason": str(m["reason"]),
            "ts": int(m["ts"]),
        }
    except Exception as exc:
        return {"id": evidence_id, "unreadable": repr(exc)}


def decode_evidence(data: bytes, model_hash: str) -> Evidence:
    """Parse and statically check evidence (signatures, hashes, key); no model run."""
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceRejected("oversize")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(m, dict) or m.get("v") != EVIDENCE_VERSION:
            raise ValueError("not v1 evidence")
        header = ResponseHeader.from_msg(m["header"])
        prompt = m["prompt"]
        if not (
            isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)
        ):
            raise ValueError("bad prompt")
        ev = Evidence(
            str(m["model_hash"]),
            str(m["accuser"]),
            int(m["ts"]),
            header,
            bytes(m["body"]),
            tuple(prompt),
            dict(m["params"]),
            str(m["reason"]),
            bytes(m["sig"]),
        )
        params = ev.sampling_params()
    except (BadResponse, KeyError, TypeError, ValueError) as exc:
        raise EvidenceRejected(f"malformed: {exc}") from exc
    if ev.model_hash != model_hash or header.model_hash != model_hash:
        raise EvidenceRejected("wrong-model")
    if not verify_by_peer(ev.accuser, ev.sig, ev.payload()):
        raise EvidenceRejected("bad-signature: accuser")
    if not header.signature_ok():
        raise EvidenceRejected("bad-signature: the accused response")
    if header.requester != ev.accuser:
        raise EvidenceRejected("the response was not sent to the accuser")
    if hashlib.sha256(ev.body).hexdigest() != header.sha256 or len(ev.body) != header.size:
        raise EvidenceRejected("body does not match the signed response")
    try:
        ev.entry()
    except BadResponse as exc:
        raise EvidenceRejected(f"malformed: {exc}") from exc
    # The liar signed "this body answers key K" (the header). K must be what the prompt and
    # params hash to; the body's own key is *not* required to match: an entry made for another
    # key, served for K, is one of the lies (the receiver's verifier finds it statically).
    if input_sha256(model_hash, ev.prompt, params) != header.key:
        raise EvidenceRejected("key does not match prompt and params")
    return ev
