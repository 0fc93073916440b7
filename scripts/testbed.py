#!/usr/bin/env python
"""Run the docker-compose.yml testbed without Docker: the same services as local processes.

    .venv/bin/python scripts/testbed.py [--compose docker-compose.yml] [--data-root DIR]
                                        [--port-offset 0]

Every compose service with a ``P2PCACHE_HTTP`` environment is a node: it runs as
``p2pcache node run`` on 127.0.0.1 with the compose file's published host ports (HTTP and
libp2p), its environment, and its own data dir; ``http://<service>:8080`` URLs (bootstrap_http,
the client's --url) are rewritten to the matching 127.0.0.1 port. Nodes start in
``depends_on`` order, each waited on until ready (bounded). Then the client service's command
runs (the workload), and every node gets SIGTERM and must exit 0. Exit code: the client's,
or 1 if a node failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTAINER_HTTP_PORT = 8080
CONTAINER_P2P_PORT = 4001


@dataclass
class NodeSpec:
    name: str
    http_port: int  # published host port of the container's 8080
    p2p_port: int  # published host port of the container's 4001
    env: dict[str, str]
    depends_on: list[str] = field(default_factory=list)


@dataclass
class Plan:
    nodes: list[NodeSpec]  # in start order
    client_command: list[str]
    client_env: dict[str, str] = field(default_factory=dict)  # e.g. the admin token

    def url_map(self, offset: int = 0) -> dict[str, str]:
        return {
            f"http://{n.name}:{CONTAINER_HTTP_PORT}": f"http://127.0.0.1:{n.http_port + offset}"
            for n in self.nodes
        }


def _published(ports: list[str], container_port: int) -> int:
    for p in ports:
        host, _, cont = str(p).rpartition(":")
        if cont.split("/")[0] == str(container_port):
            return int(host.rsplit(":", 1)[-1])
    raise ValueError(f"no published port for container port {container_port} in {ports}")


def plan_from_compose(path: Path) -> Plan:
    import yaml

    doc = yaml.safe_load(path.read_text())
    services: dict[str, Any] = doc["services"]
    specs: dict[str, NodeSpec] = {}
    client: list[str] | None = None
    client_env: dict[str, str] = {}
    for name, svc in services.items():
        env = {str(k): str(v) for k, v in (svc.get("environment") or {}).items()}
        deps = list(svc.get("depends_on") or [])
        if "P2PCACHE_HTTP" in env:
            ports = svc.get("ports") or []
            specs[name] = NodeSpec(
                name,
                _published(ports, CONTAINER_HTTP_PORT),
                _published(ports, CONTAINER_P2P_PORT),
                env,
                deps,
            )
        elif name == "client":
            client = [*svc.get("entrypoint", []), *svc.get("command", [])]
            client_env = env
    if client is None:
        raise ValueError(f"{path} has no client service")
    order: list[NodeSpec] = []
    seen: set[str] = set()

    def visit(n: str, stack: tuple[str, ...] = ()) -> None:
        if n in seen:
            return
        if n in stack:
            raise ValueError(f"depends_on cycle through {n}")
        for d in specs[n].depends_on:
            if d in specs:
                visit(d, (*stack, n))
        seen.add(n)
        order.append(specs[n])

    for n in specs:
        visit(n)
    return Plan(order, client, client_env)


def rewrite(value: str, urls: dict[str, str]) -> str:
    for src, dst in urls.items():
        value = value.replace(src, dst)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--compose", type=Path, default=REPO / "docker-compose.yml")
    ap.add_argument(
        "--data-root", type=Path, help="data dirs here (default: a temporary dir, deleted)"
    )
    ap.add_argument("--port-offset", type=int, default=0, help="add this to every published port")
    ap.add_argument("--client-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)

    from p2pcache.node.cluster import NodeStartError, start_node, stop_all

    plan = plan_from_compose(args.compose)
    urls = plan.url_map(args.port_offset)
    tmp = None
    root = args.data_root
    if root is None:
        tmp = root = Path(tempfile.mkdtemp(prefix="p2pcache-testbed-"))
    procs = []
    code = 1
    try:
        for spec in plan.nodes:
            env = {k: rewrite(v, urls) for k, v in spec.env.items()}
            env["P2PCACHE_HTTP"] = f"127.0.0.1:{spec.http_port + args.port_offset}"
            env["P2PCACHE_LISTEN"] = f"/ip4/127.0.0.1/tcp/{spec.p2p_port + args.port_offset}"
            env["P2PCACHE_DATA_DIR"] = str(root / spec.name)
            node = start_node(
                spec.name,
                root / spec.name,
                http=env["P2PCACHE_HTTP"],
                listen=env["P2PCACHE_LISTEN"],
                env=env,
            )
            procs.append(node)
            print(f"{spec.name:<10} ready  {node.url}  peer {node.peer_id}", flush=True)
        command = [rewrite(c, urls) for c in plan.client_command]
        if command[0] == "python":
            command[0] = sys.executable
        print("client:", " ".join(command), flush=True)
        client_env = {**os.environ, **plan.client_env}
        code = subprocess.run(
            command, timeout=args.client_timeout, cwd=REPO, env=client_env
        ).returncode
    except NodeStartError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
    finally:
        codes = stop_all(procs)
        print("stopped:", codes, flush=True)
        if any(c != 0 for c in codes.values()):
            code = code or 1
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
