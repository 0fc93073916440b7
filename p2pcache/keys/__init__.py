"""Content addressing: which model produced an entry, and which input it answers."""

from p2pcache.keys.input_key import SamplingParams, canonical_input_bytes, input_sha256
from p2pcache.keys.model_hash import ModelHashMemo, model_hash

__all__ = [
    "ModelHashMemo",
    "SamplingParams",
    "canonical_input_bytes",
    "input_sha256",
    "model_hash",
]
