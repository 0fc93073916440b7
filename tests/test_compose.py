"""The docker-compose testbed parses and names the services and ports scripts/testbed.py uses."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from p2pcache.node.config import load_config

REPO = Path(__file__).resolve().parent.parent


def load_testbed():
    spec = importlib.util.spec_from_file_location("testbed", REPO / "scripts" / "testbed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["testbed"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_compose_topology_matches_the_testbed_script() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"bootstrap", "peer1", "peer2", "peer3", "client"}
    plan = load_testbed().plan_from_compose(REPO / "docker-compose.yml")
    assert [n.name for n in plan.nodes][0] == "bootstrap"  # started first (depends_on)
    assert {n.name for n in plan.nodes} == {"bootstrap", "peer1", "peer2", "peer3"}
    ports = {n.name: (n.http_port, n.p2p_port) for n in plan.nodes}
    assert ports == {
        "bootstrap": (18080, 14001),
        "peer1": (18081, 14002),
        "peer2": (18082, 14003),
        "peer3": (18083, 14004),
    }
    for name, svc in services.items():
        if name == "client":
            continue
        assert svc["healthcheck"]["test"][-1].endswith(":8080/healthz")
        assert svc["volumes"] == [f"{name}-data:/data"] and f"{name}-data" in doc["volumes"]
        assert svc["networks"] == ["p2p"]
        env = svc["environment"]
        # every environment key is a real config key, and the values validate
        load_config(None, env, {})
        if name != "bootstrap":
            assert env["P2PCACHE_BOOTSTRAP_HTTP"] == "http://bootstrap:8080"
            assert svc["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    # the client talks to every peer, through URLs the testbed rewrites to loopback ports
    urls = plan.url_map()
    client = [load_testbed().rewrite(c, urls) for c in plan.client_command]
    assert client[:3] == ["python", "-m", "p2pcache.node.workload"]
    assert [client[i + 1] for i, c in enumerate(client) if c == "--url"] == [
        "http://127.0.0.1:18081",
        "http://127.0.0.1:18082",
        "http://127.0.0.1:18083",
    ]


def test_dockerfile_and_entrypoint_agree_with_the_config() -> None:
    dockerfile = (REPO / "node" / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8080 4001$", dockerfile, re.M)
    assert (
        "HEALTHCHECK" in dockerfile
        and "/healthz" in dockerfile
        and "STOPSIGNAL SIGTERM" in dockerfile
    )
    entry = (REPO / "node" / "entrypoint.sh").read_text()
    assert "exec p2pcache node run --config" in entry
    cfg = load_config(REPO / "node" / "node.toml", {}, {})
    assert (
        cfg.http_port == 8080
        and cfg.listen == ["/ip4/0.0.0.0/tcp/4001"]
        and str(cfg.data_dir) == "/data"
    )


@pytest.mark.parametrize("bad", ["18080", "x:8080"])
def test_testbed_rejects_unpublished_ports(bad: str) -> None:
    with pytest.raises(ValueError):
        load_testbed()._published([bad], 8080)


def test_the_image_builds_from_a_small_context_without_dev_extras() -> None:
    dockerfile = (REPO / "node" / "Dockerfile").read_text()
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv/", ".git/", "**/__pycache__/", "data/", ".pytest_cache/"} <= ignored
    # Everything the Dockerfile copies from the context is still in it.
    sources = [
        src
        for args in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M)
        for src in args.split()[:-1]
    ]
    assert sources and all(
        not any(src.rstrip("/").startswith(i.rstrip("/")) for i in ignored) for src in sources
    ), sources
    assert "P2PCACHE_DEV=0 bash scripts/setup.sh" in dockerfile  # runtime dependencies only
