"""Local inference with llama.cpp (L3)."""

from p2pcache.backend.llama_backend import BackendConfig, Generation, LlamaBackend, PromptTooLong, Score, TokenHook
from p2pcache.backend.model_files import ModelNotFound, default_model_path, resolve_model_path
from p2pcache.backend.worker import BackendWorker, Overloaded

__all__ = [
    "BackendConfig",
    "BackendWorker",
    "Generation",
    "LlamaBackend",
    "ModelNotFound",
    "Overloaded",
    "PromptTooLong",
    "Score",
    "TokenHook",
    "default_model_path",
    "resolve_model_path",
]
