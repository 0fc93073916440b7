"""Where a node keeps its files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "P2PCACHE_DATA_DIR"


def default_data_dir() -> Path:
    """``$P2PCACHE_DATA_DIR``, else ``$XDG_DATA_HOME/p2pcache`` (``~/.local/share/p2pcache``)."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "p2pcache"


@dataclass(frozen=True)
class DataDir:
    """The layout of one node's data dir."""

    root: Path

    @classmethod
    def resolve(cls, root: str | Path | None) -> DataDir:
        return cls(Path(root).expanduser() if root else default_data_dir())

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def identity_key(self) -> Path:
        return self.root / "identity.key"

    @property
    def model_hash_memo(self) -> Path:
        return self.root / "model-hashes.json"
