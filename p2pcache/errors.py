"""Every exception p2pcache raises on purpose, in one tree.

Catch `P2PCacheError` for "anything p2pcache refused or could not do"; catch a branch for one
kind of failure. The API maps these types (not their messages) to HTTP statuses in one table
(`p2pcache.api.errors`). Each class is re-exported by the module that raises it, so
``from p2pcache.net.fetch import NotFound`` keeps working.

```
P2PCacheError
├── InvalidRequest (ValueError)          the caller asked for something impossible -> 400
│   └── PromptTooLong                    prompt + max_tokens exceed the context window
├── ConfigError (ValueError)             a node configuration key is invalid
├── ModelNotFound (FileNotFoundError)    no GGUF at the configured path
├── Unavailable                          nothing computed; retry later or elsewhere
│   ├── QueueFull                        too many requests wait for the model -> 429
│   ├── QueueTimeout                     waited too long for the model -> 503
│   ├── ShuttingDown                     the node is draining -> 503
│   └── EmbedderUnavailable              the L1 embedding model is not installed
├── ComputationFailed                    the identical request this one waited on failed
├── StorageError                         local storage
│   ├── StoreError                       a write was not committed; the store is unchanged
│   │   └── EntryTooLarge
│   ├── UnknownDatabase                  a tenant used an LMDB database it did not declare
│   ├── DuplicateDatabase                two tenants (or one twice) declared one database
│   ├── MissingDatabase                  a read-only store lacks a tenant's databases
│   └── CorruptData (ValueError)         stored bytes failed a checksum or do not decode
│       ├── CorruptValue                 an LMDB value
│       ├── CorruptChunk                 a KV chunk
│       ├── SnapshotCorrupt              the FAISS snapshot
│       └── StateFormatError             a llama.cpp state we cannot cut and rebuild
├── PeerError                            a peer, or its message, is at fault
│   ├── WireError                        a broken frame: bad, oversize, malformed, early end
│   │   └── StreamEnded                  the stream closed or reset mid-frame
│   ├── FetchError                       a fetch produced no usable value (`kind` feeds reputation)
│   │   ├── NotFound, Busy, FetchTimeout
│   │   └── BadResponse                  bad signature, hash mismatch, oversize, malformed
│   └── Rejected (ValueError)            a gossip message failed validation
│       ├── AdRejected
│       └── EvidenceRejected
└── NodeError                            talking to a node process (CLI, cluster tools)
    ├── NodeUnreachable
    ├── NodeStartError
    └── StartupError                     this node cannot start (one line: what, and the fix)
```
"""

from __future__ import annotations


class P2PCacheError(Exception):
    """The root: anything p2pcache refused or could not do."""


# -- requests ------------------------------------------------------------------------------
class InvalidRequest(P2PCacheError, ValueError):
    """The request cannot be served as asked (an empty prompt, a bad grammar, a bad parameter)."""

    param: str | None = None  # the request field at fault, when known


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens do not fit in the context window."""


class ConfigError(P2PCacheError, ValueError):
    """The configuration is invalid; the message says which key, value and source."""


class ModelNotFound(P2PCacheError, FileNotFoundError):
    """No model file where the configuration says it is."""


# -- capacity ------------------------------------------------------------------------------
class Unavailable(P2PCacheError):
    """Nothing was computed; the caller may retry later (or on another node)."""


class Overloaded(Unavailable):
    """The model's queue refused the call (`QueueFull`, `QueueTimeout`, `ShuttingDown`)."""


class QueueFull(Overloaded):
    """Too many calls already wait for the model."""


class QueueTimeout(Overloaded):
    """The call waited longer than the queue timeout for the model."""


class ShuttingDown(Overloaded):
    """The node is draining: new model calls are refused."""


class EmbedderUnavailable(Unavailable):
    """The embedding model package (or tokenizers / safetensors) is not installed."""


class ComputationFailed(P2PCacheError):
    """The identical request this one waited on (single flight) failed; ``__cause__`` is its
    error (the API answers a waiter as it answered that request)."""


# -- storage -------------------------------------------------------------------------------
class StorageError(P2PCacheError):
    """Local storage failed."""


class StoreError(StorageError):
    """A write could not be committed; the store is unchanged."""


class EntryTooLarge(StoreError):
    """The entry is larger than the store accepts."""


class UnknownDatabase(StorageError):
    """A tenant of the LMDB environment asked for a database its schema does not declare."""


class DuplicateDatabase(StorageError):
    """A database name was declared by two tenants, or twice by one."""


class MissingDatabase(StorageError):
    """A store opened read-only lacks a tenant's databases (that tenant never wrote there)."""


class CorruptData(StorageError, ValueError):
    """Stored bytes failed their checksum or could not be decoded."""


class CorruptValue(CorruptData):
    """A stored value failed its checksum or could not be decoded."""


class CorruptChunk(CorruptData):
    """A stored KV chunk failed its checksum or has the wrong size."""


class SnapshotCorrupt(CorruptData):
    """The FAISS snapshot beside LMDB does not load; it is rebuilt from LMDB."""


class StateFormatError(CorruptData):
    """The state bytes do not have the layout we know how to cut and rebuild."""


# -- peers ---------------------------------------------------------------------------------
class PeerError(P2PCacheError):
    """A peer, or a message from one, is at fault."""


class WireError(PeerError):
    """The peer broke the protocol: bad frame, oversize, malformed, early end."""


class StreamEnded(WireError):
    """The stream closed or reset before the frame was complete (peer gone or gave up)."""


class FetchError(PeerError):
    """A fetch that did not produce a usable value. ``kind`` feeds reputation."""

    kind = "error"


class NotFound(FetchError):
    kind = "not_found"


class Busy(FetchError):
    kind = "busy"


class FetchTimeout(FetchError):
    kind = "timeout"


class BadResponse(FetchError):
    """Protocol violation: bad signature, hash mismatch, oversize, malformed."""

    kind = "bad_response"


class Rejected(PeerError, ValueError):
    """A gossip message failed validation; the message says why."""


class AdRejected(Rejected):
    """An advertisement failed validation."""


class EvidenceRejected(Rejected):
    """A piece of evidence failed validation."""


# -- node processes ------------------------------------------------------------------------
class NodeError(P2PCacheError):
    """Talking to, or starting, a node process failed."""


class NodeUnreachable(NodeError):
    """The node's HTTP API did not answer."""


class NodeStartError(NodeError):
    """A node process did not come up."""


class StartupError(NodeError):
    """This node cannot start: a port is taken, the data dir is not writable, the disk is
    full, the model file is missing... The message is one line that says what failed and how
    to fix it; the CLI prints it without a traceback."""
