"""Shared fixtures. The real model is loaded once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcache.backend import BackendConfig, BackendWorker, LlamaBackend, default_model_path
from p2pcache.identity import Identity
from p2pcache.keys import model_hash
from p2pcache.paths import HOME_ENV
from p2pcache.resolver import Resolver
from p2pcache.store import Store


@pytest.fixture(scope="session", autouse=True)
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nodes the tests start record themselves for the CLI (last-node.json): in a temp dir,
    never in the user's ~/.config (node processes inherit the environment)."""
    home = tmp_path_factory.mktemp("cli-home")
    before = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    yield home
    if before is None:
        os.environ.pop(HOME_ENV, None)
    else:
        os.environ[HOME_ENV] = before


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def backend(model_path: Path) -> Iterator[LlamaBackend]:
    b = LlamaBackend(BackendConfig(model_path=model_path, n_ctx=2048))
    yield b
    b.close()


@pytest.fixture(scope="session")
def default_model_hash(model_path: Path) -> str:
    return model_hash(model_path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store", size_cap=64 * 1024**2)
    yield s
    s.close()


@pytest.fixture
def resolver(
    store: Store, backend: LlamaBackend, default_model_hash: str, tmp_path: Path
) -> Resolver:
    identity = Identity.load_or_create(tmp_path / "identity.key")
    return Resolver(store, BackendWorker(backend), default_model_hash, identity)
