"""Local inference with llama.cpp (L3). `p2pcache.backend.llama_backend` is the only module
of the package that imports llama_cpp."""

from p2pcache.backend.llama_backend import LlamaBackend
from p2pcache.backend.model_files import ModelNotFound, default_model_path, resolve_model_path
from p2pcache.backend.state_buffer import StateBuffer
from p2pcache.backend.stops import stop_cut
from p2pcache.backend.types import (
    BackendConfig,
    Divergence,
    DraftOutcome,
    EvalHook,
    Generation,
    KvCacheInfo,
    Score,
    TokenHook,
)
from p2pcache.backend.worker import BackendWorker, Overloaded
from p2pcache.errors import PromptTooLong

__all__ = [
    "BackendConfig",
    "BackendWorker",
    "Divergence",
    "DraftOutcome",
    "EvalHook",
    "Generation",
    "KvCacheInfo",
    "LlamaBackend",
    "ModelNotFound",
    "Overloaded",
    "PromptTooLong",
    "Score",
    "StateBuffer",
    "TokenHook",
    "default_model_path",
    "resolve_model_path",
    "stop_cut",
]
