"""Node configuration: a TOML file, then environment variables, then command-line flags.

Each later source overrides the earlier ones key by key. Every key has one environment
variable, ``P2PCACHE_<KEY>`` in upper case (lists are comma-separated). The merged result is
validated once; an error names the key, the bad value and where it came from.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from p2pcache.api.context import ApiSettings
from p2pcache.errors import ConfigError  # noqa: F401 - re-exported
from p2pcache.net.config import (
    ConnLimits,
    DiscoveryConfig,
    KvNetConfig,
    ReachConfig,
    RelayConfig,
    WarmConfig,
)
from p2pcache.node.options import NodeOptions
from p2pcache.semantic.tier import SemanticConfig

ENV_PREFIX = "P2PCACHE_"
CONFIG_ENV = "P2PCACHE_CONFIG"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512 MB"`` or ``"1048576"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    raise ValueError(f"expected a size such as 4GiB or 512MB, got {value!r}")


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:8080, got {value!r}")
    return host, int(port)


class NodeConfig(BaseModel):
    """Everything a node needs to run. Unknown keys are errors (typos never pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path | None = Field(None, description="Data dir (store, identity, model hash memo).")
    model: Path | None = Field(None, description="GGUF model file; default: embedded Gemma 3 270M.")
    model_name: str | None = Field(
        None, description="Model id served at /v1/models; default: the file's stem."
    )
    http: str = Field(
        "127.0.0.1:8080", description="HTTP API address HOST:PORT (port 0: any free port)."
    )
    listen: list[str] = Field(["/ip4/0.0.0.0/tcp/4001"], description="libp2p listen multiaddrs.")
    bootstrap: list[str] = Field(
        [], description="libp2p bootstrap multiaddrs ending in /p2p/<peer id>."
    )
    bootstrap_http: list[str] = Field(
        [],
        description="HTTP URLs of running nodes whose /admin/status addrs join the bootstrap list.",
    )
    bootstrap_wait_s: float = Field(
        60.0, gt=0, description="How long to wait for bootstrap_http nodes."
    )
    mdns: bool = Field(
        DiscoveryConfig.mdns,
        description="Find peers on the local network by mDNS (announces this node to the LAN).",
    )
    discovery: bool = Field(
        DiscoveryConfig.enabled,
        description="Find the model's providers by rendezvous at the bootstrap peers.",
    )
    reachability: bool = Field(
        ReachConfig.enabled,
        description="Ask peers to dial this node back (and answer their requests) to learn "
        "whether it is reachable; a private node then uses a relay.",
    )
    relay_service: Literal["auto", "on", "off"] = Field(
        RelayConfig.service,
        description="Relay for nodes behind NAT: auto (once found public), on or off.",
    )
    max_conns_per_ip: int = Field(
        ConnLimits.max_per_ip,
        ge=1,
        le=1024,
        description="Inbound libp2p connections from one IP address (nodes behind one NAT "
        "or on one host share it).",
    )
    warm_peers: int = Field(
        WarmConfig.max_peers,
        ge=0,
        le=256,
        description="Producers dialled as their adverts arrive, "
        "before a request needs them (0: off).",
    )
    share_by_default: bool = Field(
        ApiSettings.share_by_default,
        description="Share entries with peers unless a request says otherwise.",
    )
    n_ctx: int = Field(
        NodeOptions.n_ctx, ge=256, le=1 << 20, description="Context window in tokens."
    )
    n_gpu_layers: int | None = Field(
        NodeOptions.n_gpu_layers,
        ge=-1,
        description="Layers on the GPU (-1 all, 0 none; default: all if any GPU).",
    )
    kv_prefix: bool = Field(
        NodeOptions.kv_prefix, description="Resume local inference from stored KV prefixes."
    )
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field(
        NodeOptions.kv_type, description="KV cache element type."
    )
    kv_net: bool = Field(
        KvNetConfig.enabled,
        description="Share KV prefix chunks with peers and fetch the ones a prompt lacks.",
    )
    kv_peer_min_score: float = Field(
        KvNetConfig.min_score,
        ge=0.0,
        le=1.0,
        description="Fetch KV chunks only from peers whose reputation score is above this.",
    )
    kv_spot_check_rate: float = Field(
        KvNetConfig.spot_check_rate,
        ge=0.0,
        le=1.0,
        description="Fraction of KV fetches recomputed locally to check the peer.",
    )
    semantic: bool = Field(
        NodeOptions.semantic, description='Enable L1 (requests opt in with "semantic": true).'
    )
    semantic_tau: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=f"L1 cosine similarity a candidate needs (default {SemanticConfig.tau}).",
    )
    semantic_margin: float | None = Field(
        None,
        ge=0.0,
        description="L1 gate: nats per token the cached answer may lose "
        f"(default {SemanticConfig.margin}).",
    )
    size_cap: int = Field(
        NodeOptions.size_cap, gt=0, description="Store size cap in bytes (or 4GiB, 512MB)."
    )
    max_queue: int = Field(
        16, ge=0, le=100_000, description="Requests that may wait for the model; more get 429."
    )
    queue_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the model before 503.")
    max_tokens_limit: int = Field(
        ApiSettings.max_tokens_limit, ge=1, description="Largest max_tokens a request may ask for."
    )
    default_max_tokens: int = Field(
        ApiSettings.default_max_tokens, ge=1, description="max_tokens when a request gives none."
    )
    max_body_bytes: int = Field(
        ApiSettings.max_body_bytes,
        ge=1024,
        description="Largest HTTP request body (bytes or 1MiB).",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line."
    )
    admin_token: str | None = Field(
        None, description="If set, /admin/* and /metrics need 'Authorization: Bearer <token>'."
    )

    @field_validator("http")
    @classmethod
    def _check_http(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("listen", "bootstrap")
    @classmethod
    def _check_multiaddrs(cls, v: list[str], info: Any) -> list[str]:
        from multiaddr import Multiaddr

        for addr in v:
            try:
                Multiaddr(addr)
            except Exception as exc:  # multiaddr raises several error types
                raise ValueError(f"not a multiaddr: {addr!r} ({exc})") from None
            if info.field_name == "bootstrap" and "/p2p/" not in addr:
                raise ValueError(f"a bootstrap address must end in /p2p/<peer id>: {addr!r}")
        return v

    @field_validator("bootstrap_http")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.match(r"^https?://[^/\s]+(/.*)?$", url):
                raise ValueError(f"expected an http:// URL, got {url!r}")
        return [u.rstrip("/") for u in v]

    @field_validator("size_cap", "max_body_bytes", mode="before")
    @classmethod
    def _sizes(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("admin_token", "model_name")
    @classmethod
    def _non_empty(cls, v: str | None) -> str | None:
        return v or None

    @property
    def http_host(self) -> str:
        return parse_hostport(self.http)[0]

    @property
    def http_port(self) -> int:
        return parse_hostport(self.http)[1]

    def to_toml_dict(self) -> dict[str, Any]:
        """The config as TOML-writable values (None left out)."""
        return {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in self.model_dump().items()
            if v is not None
        }


FIELDS = tuple(NodeConfig.model_fields)
_LIST_FIELDS = {"listen", "bootstrap", "bootstrap_http"}
_BOOL_FIELDS = {"share_by_default", "kv_prefix", "kv_net", "semantic"}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in FIELDS:
        raw = env.get(env_name(key))
        if raw is None:
            continue
        if key in _LIST_FIELDS:
            out[key] = [part.strip() for part in raw.split(",") if part.strip()]
        elif key in _BOOL_FIELDS:
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"{env_name(key)}={raw!r}: expected true or false")
            out[key] = low in ("1", "true", "yes", "on")
        elif raw.strip() == "" and key in (
            "model",
            "data_dir",
            "n_gpu_layers",
            "admin_token",
            "model_name",
        ):
            continue
        else:
            out[key] = raw
    return out


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in FIELDS:
            hint = difflib.get_close_matches(key, FIELDS, n=1)
            raise ConfigError(
                f"{path}: unknown key {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known keys: {', '.join(FIELDS)}"
            )
        if isinstance(value, dict):
            raise ConfigError(f"{path}: {key!r} must be a value, not a [table]")
    # Relative paths in a config file are relative to the file, not to the working dir.
    for key in ("data_dir", "model"):
        if isinstance(data.get(key), str) and data[key]:
            p = Path(data[key]).expanduser()
            data[key] = p if p.is_absolute() else (path.parent / p).resolve()
    return data


def load_config(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge TOML < environment < flags (flags whose value is None are not given) and validate."""
    env = os.environ if env is None else env
    if config_file is None and env.get(CONFIG_ENV):
        config_file = env[CONFIG_ENV]
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), _from_toml(Path(config_file).expanduser())))
    layers.append(("environment", _from_env(env)))
    layers.append(("flags", {k: v for k, v in (flags or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, layer in layers:
        for key, value in layer.items():
            merged[key] = value
            source[key] = (
                f"env {env_name(key)}"
                if name == "environment"
                else f"--{key.replace('_', '-')}"
                if name == "flags"
                else name
            )
    try:
        return NodeConfig(**merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            value = merged.get(key)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key} = {value!r} (from {source.get(key, 'defaults')}): {msg}")
        raise ConfigError("invalid node configuration:\n  " + "\n  ".join(lines)) from None
