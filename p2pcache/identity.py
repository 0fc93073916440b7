"""A node's persistent Ed25519 identity and its libp2p-compatible peer id.

The key file holds the raw 32-byte private seed (mode 0600), so the same key serves
`cryptography` (signing entries) and py-libp2p (the host identity) alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_PB_ED25519_PREFIX = b"\x08\x01\x12\x20"


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def peer_id_from_public(raw_public: bytes) -> str:
    """The libp2p peer id (identity multihash, base58btc) of an Ed25519 public key."""
    pb = _PB_ED25519_PREFIX + raw_public
    return b58encode(bytes([0x00, len(pb)]) + pb)


def verify_signature(raw_public: bytes, signature: bytes, payload: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw_public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public(self.public_bytes)

    def sign(self, payload: bytes) -> bytes:
        return self.private_key.sign(payload)

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        path = Path(path)
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ValueError(f"identity key file {path} is not a 32-byte Ed25519 seed")
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        identity = cls(Ed25519PrivateKey.generate())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # never a half-written identity
        return identity
