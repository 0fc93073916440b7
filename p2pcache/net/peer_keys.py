"""Peer ids <-> Ed25519 public keys, and signatures that bind bytes to a peer id."""

from __future__ import annotations

import msgpack
from libp2p.peer.id import ID

from p2pcache.identity import peer_id_from_public, verify_signature

_PREFIX = b"\x00\x24\x08\x01\x12\x20"  # identity multihash of an Ed25519 PublicKey protobuf


def public_key_of(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer id (Ed25519 ids embed their key)."""
    try:
        raw = ID.from_base58(peer_id).to_bytes()
    except Exception as exc:
        raise ValueError(f"not a peer id: {peer_id!r}") from exc
    if len(raw) != len(_PREFIX) + 32 or not raw.startswith(_PREFIX):
        raise ValueError(f"not an Ed25519 peer id: {peer_id!r}")
    pub = raw[len(_PREFIX) :]
    if peer_id_from_public(pub) != peer_id:
        raise ValueError("peer id does not round-trip")
    return pub


def canonical(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def verify_by_peer(peer_id: str, signature: bytes, payload: bytes) -> bool:
    try:
        pub = public_key_of(peer_id)
    except ValueError:
        return False
    return (
        isinstance(signature, bytes)
        and len(signature) == 64
        and verify_signature(pub, signature, payload)
    )
