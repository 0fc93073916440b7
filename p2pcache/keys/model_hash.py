"""`model_hash`: sha256 of a GGUF file's bytes, memoized so a restart does not rehash.

Hashing 250 MB costs ~0.5 s and a 8 GB model ~20 s, so the digest is remembered in a small
JSON file keyed by (resolved path, size, mtime_ns). Any change to the file changes size or
mtime and forces a rehash; a memo that cannot be read is ignored, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 4 * 1024 * 1024

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a file is hashed."""


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelHashMemo:
    """A JSON file mapping file identity -> sha256 hex digest."""

    path: Path

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def get(self, model_path: Path) -> str | None:
        return self._load().get(_file_identity(model_path))

    def put(self, model_path: Path, digest: str) -> None:
        data = self._load()
        data[_file_identity(model_path)] = digest
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a crash never leaves a half-written memo.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memo-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, self.path)


def model_hash(
    model_path: str | Path,
    memo: ModelHashMemo | None = None,
    progress: ProgressFn | None = None,
) -> str:
    """sha256 hex digest of the model file, from the memo when the file is unchanged."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if memo is not None and (cached := memo.get(path)) is not None:
        return cached
    digest = sha256_file(path, progress)
    if memo is not None:
        memo.put(path, digest)
    return digest
