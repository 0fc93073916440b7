"""Where a node keeps its files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "P2PCACHE_DATA_DIR"
HOME_ENV = "P2PCACHE_HOME"


def default_data_dir() -> Path:
    """``$P2PCACHE_DATA_DIR``, else ``$XDG_DATA_HOME/p2pcache`` (``~/.local/share/p2pcache``)."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "p2pcache"


def cli_home() -> Path:
    """Where the CLI keeps its own state (``last-node.json``): ``$P2PCACHE_HOME``, else
    ``$XDG_CONFIG_HOME/p2pcache`` (``~/.config/p2pcache``). Tests point it at a temp dir."""
    if env := os.environ.get(HOME_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "p2pcache"


def last_node_path() -> Path:
    """The record of the node started last (data dir, URL, pid): how the CLI finds it."""
    return cli_home() / "last-node.json"


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

    @property
    def node_info(self) -> Path:
        """Written by the running node (its ready line), removed when it stops."""
        return self.root / "node.json"

    @property
    def admin_token(self) -> Path:
        """The admin token a node generated because its HTTP API is not loopback-only."""
        return self.root / "admin.token"
