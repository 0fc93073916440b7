"""The one LMDB environment of a data dir, and what its tenants share.

A data dir's ``store/`` is one LMDB environment holding the named databases of several tenants:
the entry store, KV chunks, peer reputation and the semantic index. `LmdbEnv` owns it: it alone
opens it (map size, ``max_dbs``, sync options), and each tenant declares its databases in a
`Schema` and gets their handles from `LmdbEnv.open`. A name that another tenant already claimed
is refused (`DuplicateDatabase`), and so is a name the tenant did not declare
(`UnknownDatabase`), so two modules can never write the same database by accident.

Tenants that buffer writes in memory register a flush with `LmdbEnv.on_close`: closing the
environment writes them first.

The helpers every tenant stores the same way live here too: u64 counters updated inside the
caller's transaction (`Counters`), checksummed value frames (`encode_frame`, `decode_frame`) and
millisecond timestamps (`now_ms`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Literal, TypeAlias

import lmdb

from p2pcache.errors import (  # noqa: F401 - re-exported
    CorruptValue,
    DuplicateDatabase,
    MissingDatabase,
    UnknownDatabase,
)

log = logging.getLogger(__name__)

# Named databases the environment can hold, all tenants together. Part of how every process
# opens a data dir (a running node and the offline CLI alike), so it is set here only.
MAX_DBS = 16

Database: TypeAlias = Any  # lmdb's handle type (`lmdb._Database`) is private and untyped
ByteOrder = Literal["little", "big"]


def now_ms() -> int:
    """Wall-clock milliseconds: the timestamp unit of every stored record."""
    return time.time_ns() // 1_000_000


# -- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Schema:
    """The named databases one tenant keeps in the environment (names as stored, utf-8)."""

    tenant: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise DuplicateDatabase(f"{self.tenant} declares a database twice: {self.names}")


class Databases:
    """One tenant's database handles, by the names its schema declares."""

    def __init__(self, env: LmdbEnv, schema: Schema, handles: Mapping[str, Database]) -> None:
        self.env = env
        self.schema = schema
        self._handles = dict(handles)

    def __getitem__(self, name: str) -> Database:
        try:
            return self._handles[name]
        except KeyError:
            raise UnknownDatabase(
                f"{self.schema.tenant} did not declare a database {name!r} "
                f"(it has {', '.join(self.schema.names)})"
            ) from None


class LmdbEnv:
    """The LMDB environment under ``path`` and the registry of its named databases.

    Thread-safe: LMDB transactions are; the registry and the close hooks have a lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 10 << 20,
        durable: bool = True,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            # LMDB readers never block the writer: a running node's store may be read.
            if not (self.path / "data.mdb").exists():
                raise FileNotFoundError(f"no store at {self.path}")
            self._env = lmdb.open(
                str(self.path), readonly=True, max_dbs=MAX_DBS, lock=True, readahead=False
            )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            # sync/metasync off trades the last commits on power loss for speed (tests,
            # benches); a crash of the process alone loses nothing either way.
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=MAX_DBS,
                sync=durable,
                metasync=durable,
                readahead=False,
            )
        self.map_size: int = self._env.info()["map_size"]
        self._lock = threading.Lock()
        self._owners: dict[str, str] = {}  # database name -> tenant
        self._opened: dict[str, Databases] = {}  # tenant -> its handles
        self._on_close: list[Callable[[], Callable[[], None] | None]] = []
        self.closed = False

    @classmethod
    def open_readonly(cls, path: str | Path) -> LmdbEnv:
        """A data dir's store, read-only (another process may be writing it). Raises
        FileNotFoundError when there is no store at ``path``."""
        return cls(path, readonly=True)

    def open(self, schema: Schema) -> Databases:
        """The handles of ``schema``'s databases, created if absent (in one transaction).

        A tenant may open its schema again (several `KvChunkStore` views of one store): it gets
        the same handles. Raises DuplicateDatabase when another tenant claimed one of the names,
        MissingDatabase when a read-only environment lacks one."""
        with self._lock:
            known = self._opened.get(schema.tenant)
            if known is not None:
                if known.schema != schema:
                    raise DuplicateDatabase(f"tenant {schema.tenant!r} opened with two schemas")
                return known
            for name in schema.names:
                owner = self._owners.get(name)
                if owner is not None:
                    raise DuplicateDatabase(
                        f"database {name!r} of {schema.tenant} belongs to {owner}"
                    )
            dbs = Databases(self, schema, self._open_handles(schema))
            self._opened[schema.tenant] = dbs
            self._owners.update(dict.fromkeys(schema.names, schema.tenant))
            return dbs

    def _open_handles(self, schema: Schema) -> dict[str, Database]:
        if self.readonly:
            try:
                return {n: self._env.open_db(n.encode(), create=False) for n in schema.names}
            except lmdb.NotFoundError as exc:
                raise MissingDatabase(f"{self.path} has no {schema.tenant} databases") from exc
        with self._env.begin(write=True) as txn:
            return {n: self._env.open_db(n.encode(), txn=txn) for n in schema.names}

    def begin(
        self, *, write: bool = False, db: Database | None = None, buffers: bool = False
    ) -> lmdb.Transaction:
        return self._env.begin(write=write, db=db, buffers=buffers)

    # -- lifecycle -----------------------------------------------------------------------
    def on_close(self, flush: Callable[[], None]) -> None:
        """Call ``flush`` (a tenant's write of its buffered state) before closing. Bound
        methods are held weakly: a tenant that is gone needs no flush."""
        ref: Callable[[], Callable[[], None] | None]
        if isinstance(flush, MethodType):
            ref = weakref.WeakMethod(flush)
        else:
            ref = lambda: flush  # noqa: E731
        with self._lock:
            self._on_close.append(ref)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            hooks, self._on_close = self._on_close, []
        for ref in hooks:
            flush = ref()
            if flush is None:
                continue
            try:
                flush()
            except Exception:  # one tenant's failed flush must not keep the others unwritten
                log.exception("flush before closing %s failed", self.path)
        with self._lock:
            self.closed = True
        self._env.close()

    def __enter__(self) -> LmdbEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- u64 counters ---------------------------------------------------------------------------
def unpack_u64(raw: bytes | memoryview | None, byteorder: ByteOrder = "little") -> int:
    return int.from_bytes(raw, byteorder) if raw else 0


def pack_u64(value: int, byteorder: ByteOrder = "little") -> bytes:
    return value.to_bytes(8, byteorder)


@dataclass(frozen=True)
class Counters:
    """Named non-negative u64 counters in one database, read and written inside the caller's
    transaction, so that they change atomically with the data they count."""

    db: Database
    byteorder: ByteOrder = "little"

    def get(self, txn: lmdb.Transaction, name: str | bytes) -> int:
        return unpack_u64(txn.get(_name(name), db=self.db), self.byteorder)

    def set(self, txn: lmdb.Transaction, name: str | bytes, value: int) -> None:
        txn.put(_name(name), pack_u64(value, self.byteorder), db=self.db)

    def add(self, txn: lmdb.Transaction, name: str | bytes, delta: int) -> None:
        """Add ``delta`` (clamped at 0); a zero delta writes nothing."""
        if delta:
            self.set(txn, name, max(0, self.get(txn, name) + delta))

    def read(self, txn: lmdb.Transaction, names: Iterable[str]) -> dict[str, int]:
        return {name: self.get(txn, name) for name in names}


def _name(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else name


# -- checksummed frames ---------------------------------------------------------------------
FRAME_VERSION = 1
_CHECKSUM_LEN = 16
_HEADER_LEN = 1 + _CHECKSUM_LEN


def encode_frame(payload: bytes) -> bytes:
    """``version | blake2b-128(payload) | payload``: cheap to check on every read."""
    digest = hashlib.blake2b(payload, digest_size=_CHECKSUM_LEN).digest()
    return bytes([FRAME_VERSION]) + digest + payload


def decode_frame(value: bytes | memoryview) -> bytes:
    """The payload of a frame; raises CorruptValue when the header or checksum is wrong."""
    value = bytes(value)
    if len(value) < _HEADER_LEN or value[0] != FRAME_VERSION:
        raise CorruptValue("bad frame header")
    payload = value[_HEADER_LEN:]
    if hashlib.blake2b(payload, digest_size=_CHECKSUM_LEN).digest() != value[1:_HEADER_LEN]:
        raise CorruptValue("checksum mismatch")
    return payload
